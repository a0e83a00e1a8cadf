"""Per-client limits: requests and tokens per rolling window (deques of timestamps), and requests in flight.

One lock guards every client's state: the work under it is a few deque operations, far below the cost of a
request, and it keeps the check-then-count of each request atomic.
"""
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from ..errors import ApiError
from ..families import RateState

WINDOW_S = 60.0


@dataclass(frozen=True)
class Limits:
    """A client's limits; 0 means no limit."""

    rpm: int = 0
    tpm: int = 0
    concurrent: int = 0

    @property
    def any(self) -> bool:
        """True when at least one limit is on."""
        return bool(self.rpm or self.tpm or self.concurrent)


class RateLimited(ApiError):
    """A client went over one of its limits; Retry-After says when it may try again."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message, limit, retry_after_s, rate=None):
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})
        self.limit = limit
        self.rate = rate  # the client's RateState, shown in the headers of the client's API family

    def headers_for(self, family) -> dict:
        """Retry-After and the family's rate-limit headers."""
        return {**self.headers, **family.rate_headers(self.rate)} if self.rate else self.headers


class _ClientState:
    __slots__ = ("requests", "tokens", "token_total", "in_flight")

    def __init__(self):
        self.requests = deque()  # monotonic times of admitted requests
        self.tokens = deque()  # (monotonic time, tokens) of finished requests
        self.token_total = 0
        self.in_flight = 0  # counted whatever the limits: a client with a request running is never idle

    def prune(self, now, window):
        cutoff = now - window
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= cutoff:
            self.token_total -= self.tokens.popleft()[1]

    @property
    def idle(self):
        return not (self.requests or self.tokens or self.in_flight)


@dataclass
class Lease:
    """One admitted request: its client, and its standing against its limits (for the rate-limit headers)."""

    client: str
    rate: RateState = None
    holds_slot: bool = False  # counted among its client's requests in flight, until release() frees it (once)
    lease_id: str = None  # its entry in a shared store, if any


# What each limit's refusal says, and the setting that sets it.
_REFUSALS = {"concurrent": ("requests in flight at once", "RATE_LIMIT_CONCURRENT"),
             "rpm": ("requests per minute", "RATE_LIMIT_RPM"), "tpm": ("tokens per minute", "RATE_LIMIT_TPM")}


def refusal(client: str, limits: Limits, limit: str, retry_after_s: float, rate: RateState) -> RateLimited:
    """The 429 for client going over one of its limits ("concurrent", "rpm" or "tpm")."""
    words, setting = _REFUSALS[limit]
    return RateLimited(f"Rate limit reached for {client}: {getattr(limits, limit)} {words} ({setting})", limit,
                       retry_after_s, rate)


class LimitTable:
    """Every client's limits: the defaults, the per-client overrides, and the stored keys' own (set_own)."""

    def __init__(self, default: Limits, overrides=None):
        self.default = default
        # A client's weight (RATE_LIMITS client:weight=N) is the scheduler's, not a limit.
        self.overrides = {client: Limits(**{**default.__dict__,
                                            **{name: value for name, value in limits.items() if name != "weight"}})
                          for client, limits in (overrides or {}).items()}
        self._configured_active = default.any or any(limits.any for limits in self.overrides.values())
        self.own = {}  # client -> Limits of a stored key (service/store), set while the gateway runs
        self._own_limited = set()  # the clients of self.own with any limit on: `active` stays one lookup

    def limits_for(self, client: str) -> Limits:
        """The limits that apply to client."""
        own = self.own.get(client)
        return own if own is not None else self.overrides.get(client, self.default)

    def set_own(self, client: str, limits):
        """Give client limits of its own (a stored key's), or None to go back to the configured ones."""
        if limits is None:
            self.own.pop(client, None)
            self._own_limited.discard(client)
            return
        self.own[client] = limits
        (self._own_limited.add if limits.any else self._own_limited.discard)(client)

    @property
    def active(self) -> bool:
        """True when any client has any limit."""
        return self._configured_active or bool(self._own_limited)


class RateLimiter(LimitTable):
    """Checks and counts every client's requests, tokens and in-flight requests, in this process's memory."""

    def __init__(self, default: Limits, overrides=None, window_s=WINDOW_S, clock=time.monotonic):
        super().__init__(default, overrides)
        self.window = window_s
        self.clock = clock
        self._clients = {}
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def acquire(self, client: str) -> Lease:
        """Admit one request of client and count it, or raise RateLimited saying which limit it hit."""
        limits = self.limits_for(client)
        with self._lock:
            now = self.clock()
            self._sweep(now)
            state = self._clients.get(client)
            if state is None:
                state = self._clients[client] = _ClientState()
            state.prune(now, self.window)
            if limits.concurrent and state.in_flight >= limits.concurrent:
                raise refusal(client, limits, "concurrent", 1, self._rate(limits, state, now))
            if limits.rpm and len(state.requests) >= limits.rpm:
                raise refusal(client, limits, "rpm", state.requests[0] + self.window - now,
                              self._rate(limits, state, now))
            if limits.tpm and state.token_total >= limits.tpm:
                raise refusal(client, limits, "tpm", self._token_wait(state, limits.tpm, now),
                              self._rate(limits, state, now))
            state.requests.append(now)
            # Counted even without a concurrency limit: it keeps the client's state (and the tokens its release
            # will add) through a request that runs longer than the window.
            state.in_flight += 1
            return Lease(client, self._rate(limits, state, now), holds_slot=True)

    def release(self, lease: Lease, tokens: int = 0):
        """End an admitted request: free its in-flight slot and count the tokens it used."""
        with self._lock:
            state = self._clients.get(lease.client)
            if state is None:
                return
            if lease.holds_slot:
                state.in_flight -= 1
                lease.holds_slot = False  # a second release of this lease must not free another request's slot
            if tokens and self.limits_for(lease.client).tpm:
                state.tokens.append((self.clock(), tokens))
                state.token_total += tokens

    def _token_wait(self, state, tpm, now):
        # The moment enough of the oldest tokens leave the window to bring the total under the limit.
        total = state.token_total
        for stamp, tokens in state.tokens:
            total -= tokens
            if total < tpm:
                return stamp + self.window - now
        return self.window

    def _rate(self, limits, state, now) -> RateState:
        oldest_request = state.requests[0] if state.requests else now
        oldest_tokens = state.tokens[0][0] if state.tokens else now - self.window
        return RateState(limits, len(state.requests), oldest_request + self.window - now, state.token_total,
                         oldest_tokens + self.window - now)

    def _sweep(self, now):
        # Drop idle clients now and then so that memory stays bounded.
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.window
        idle = []
        for client, state in self._clients.items():
            state.prune(now, self.window)
            if state.idle:
                idle.append(client)
        for client in idle:
            del self._clients[client]

    def tracked_clients(self) -> int:
        """How many clients have state in memory (for tests of eviction)."""
        return len(self._clients)
