"""Slows down whoever guesses the admin key: after FAILURES wrong admin keys from one address within WINDOW_S,
every admin attempt from it, the right key included, is refused (429) until a backoff ends; each wrong key after
that locks it out again at once, for twice as long, until the address has kept quiet for FORGET_S.

Refusing the right key too is what makes the lockout hold: else a guesser would learn the key by the one attempt
that is not refused. An admin who mistyped waits LOCKOUT_S, or asks from another address.
"""
import logging
import math
import threading
import time
from collections import OrderedDict

from ..errors import ApiError

log = logging.getLogger(__name__)

FAILURES = 5
WINDOW_S = 60.0
LOCKOUT_S = 10.0  # the first lockout; each next one doubles, up to MAX_LOCKOUT_S
MAX_LOCKOUT_S = 900.0
FORGET_S = 900.0  # an address quiet this long after its last wrong key starts afresh
# Addresses remembered at most (the least recently seen go first): a guesser with many addresses costs bounded
# memory.
MAX_ADDRESSES = 10_000


class AdminLockedOut(ApiError):
    """Too many wrong admin keys from this address: no admin attempt is taken until Retry-After."""

    status = 429
    code = "admin_auth_locked"

    def __init__(self, retry_after_s):
        wait = max(1, math.ceil(retry_after_s))
        super().__init__(f"Too many wrong admin keys from this address: admin routes refuse it for {wait} s more",
                         headers={"Retry-After": str(wait)})


class _Address:
    __slots__ = ("failures", "locked_until", "lockouts", "last_failure")

    def __init__(self):
        self.failures = []  # times of wrong keys within the window, before the first lockout
        self.locked_until = float("-inf")
        self.lockouts = 0
        self.last_failure = float("-inf")


class AdminGuard:
    """Wrong admin keys per client address, and the lockouts they earn."""

    def __init__(self, failures=FAILURES, window_s=WINDOW_S, lockout_s=LOCKOUT_S, max_lockout_s=MAX_LOCKOUT_S,
                 forget_s=FORGET_S, max_addresses=MAX_ADDRESSES, counter=None, clock=time.monotonic):
        self.failures = failures
        self.window = window_s
        self.lockout = lockout_s
        self.max_lockout = max_lockout_s
        self.forget = forget_s
        self.max_addresses = max_addresses
        self.counter = counter  # a Prometheus counter of wrong admin keys, if given
        self.clock = clock
        self._addresses = OrderedDict()
        self._lock = threading.Lock()

    def check(self, address):
        """Raise AdminLockedOut while address is locked out."""
        with self._lock:
            state = self._addresses.get(address)
            wait = state.locked_until - self.clock() if state is not None else 0
        if wait > 0:
            raise AdminLockedOut(wait)

    def failed(self, address):
        """Count a wrong admin key from address; lock it out when it has had too many."""
        if self.counter is not None:
            self.counter.inc()
        with self._lock:
            now = self.clock()
            state = self._state(address, now)
            state.last_failure = now
            state.failures = [stamp for stamp in state.failures if stamp > now - self.window] + [now]
            # After a first lockout, one wrong key is enough for the next: a guesser gets one try per lockout.
            if len(state.failures) < (1 if state.lockouts else self.failures):
                return
            backoff = min(self.max_lockout, self.lockout * 2 ** state.lockouts)
            state.lockouts += 1
            state.failures = []
            state.locked_until = now + backoff
        log.warning("wrong admin keys: address locked out of the admin routes", extra={"fields": {
            "address": address, "lockout_s": backoff, "lockouts": state.lockouts}})

    def succeeded(self, address):
        """The right key from address (not locked out): what it got wrong before is forgotten."""
        with self._lock:
            self._addresses.pop(address, None)

    def _state(self, address, now) -> _Address:
        state = self._addresses.get(address)
        if state is not None and now - state.last_failure >= self.forget and now >= state.locked_until:
            state = None  # quiet long enough: a fresh start
        if state is None:
            state = self._addresses[address] = _Address()
            while len(self._addresses) > self.max_addresses:
                self._addresses.popitem(last=False)
        self._addresses.move_to_end(address)
        return state

    def tracked_addresses(self) -> int:
        """How many addresses are remembered (for tests of the bound)."""
        return len(self._addresses)
