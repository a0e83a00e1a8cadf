"""A stored key's own limits (rpm, tpm, concurrent) and scheduler weight, applied to its client (the key's name).

A key's value wins over the configured one (RATE_LIMITS for a client of that name, else RATE_LIMIT_*); a value
it leaves unset (None) is the configured one. Applied when a request with the key arrives (the store's cache
already holds a PATCH made here, or on another gateway within its refresh) and when the store says keys changed,
so that a revoked key's client leaves the tables.
"""
import threading
import time

from .limits import Limits

LIMIT_FIELDS = ("rpm", "tpm", "concurrent")


def own_limits(key, configured: Limits):
    """The limits of key's client: its own values over configured; None where it sets none (configured apply)."""
    if all(getattr(key, name) is None for name in LIMIT_FIELDS):
        return None
    return Limits(**{name: getattr(configured, name) if getattr(key, name) is None else getattr(key, name)
                     for name in LIMIT_FIELDS})


class KeyLimits:
    """Puts stored keys' limits in the limiter's table and their weights in the fair scheduler's."""

    def __init__(self, limiter, scheduler=None):
        self.limiter = limiter
        self.weights = scheduler.weights if scheduler is not None else None  # None with SCHEDULER=fifo
        self.configured_weights = dict(self.weights or {})  # RATE_LIMITS' weights, back when a key lets go
        self._applied = {}  # key id -> the StoredKey last applied
        self._lock = threading.Lock()

    def apply(self, key):
        """Make key's limits and weight its client's (nothing to do when they are already)."""
        if self._applied.get(key.id) == key:
            return
        with self._lock:
            before = self._applied.get(key.id)
            if before is not None and before.name != key.name:
                self._let_go(before.name)  # renamed: the old name's client is configured again
            self._applied[key.id] = key
            configured = self.limiter.overrides.get(key.name, self.limiter.default)
            self.limiter.set_own(key.name, own_limits(key, configured))
            if self.weights is not None:
                self._set_weight(key.name, key.weight)

    def forget(self, key):
        """Take a key's limits and weight off its client (a key revoked or expired)."""
        with self._lock:
            before = self._applied.pop(key.id, None)
            if before is not None:
                self._let_go(before.name)

    def keys_changed(self, keys, now=None):
        """The store's on_change listener: apply the usable keys, forget the others."""
        now = time.time() if now is None else now
        for key in keys:
            if key.usable(now):
                self.apply(key)
            else:
                self.forget(key)

    def _let_go(self, name):
        self.limiter.set_own(name, None)
        if self.weights is not None:
            self._set_weight(name, None)

    def _set_weight(self, name, weight):
        fallback = self.configured_weights.get(name)
        if weight is None and fallback is None:
            self.weights.pop(name, None)
        else:
            self.weights[name] = weight if weight is not None else fallback
