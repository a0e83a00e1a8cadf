"""Per-client limits kept in Redis, so that several gateway processes enforce one limit per client.

Each check-and-count is one Lua script, atomic in Redis, on three sorted sets per client: admitted requests
and finished requests' tokens (scored by time, pruned to the window), and requests in flight (scored by start,
pruned after LEASE_TTL_S so that a gateway that died cannot hold a slot for ever). Times come from Redis's own
clock, so gateways with skewed clocks still share one window.

When Redis cannot be reached, RATE_LIMIT_REDIS_FAILURE decides: open serves without the shared limit (with a
warning at most once a minute and a metric), closed refuses with 503. Either way Redis is tried again after
RETRY_S, so its return is picked up without a restart.
"""
import logging
import time
import uuid
from collections import deque

from ..errors import ApiError
from ..families import RateState
from .limits import WINDOW_S, LimitTable, Lease, refusal

log = logging.getLogger(__name__)

# How long a request may hold a concurrency slot in Redis before it counts as lost (its gateway died).
LEASE_TTL_S = 3600.0
# After Redis failed, how long to answer by RATE_LIMIT_REDIS_FAILURE without trying it.
RETRY_S = 1.0
# How long a call to Redis may take: the limit check sits in front of every request.
REDIS_TIMEOUT_S = 0.5
WARN_EVERY_S = 60.0

_PRUNE_AND_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[6]))
"""

# KEYS: requests, tokens, in flight. ARGV: window ms, rpm, tpm, concurrent, lease id, lease ttl ms.
# Idempotent for its lease id, since redis-py retries a call that timed out, and the first may have run.
# Returns {verdict, wait ms, requests in window, ms to requests reset, tokens in window, ms to tokens reset}.
ACQUIRE = _PRUNE_AND_COUNT + """
local rpm, tpm, concurrent = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local requests = redis.call('ZCARD', KEYS[1])
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local oldest_request = first[2] and tonumber(first[2]) or now
local spent = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local tokens = 0
for i = 1, #spent, 2 do tokens = tokens + tonumber(string.match(spent[i], ':(%d+)$')) end
local oldest_tokens = spent[2] and tonumber(spent[2]) or now - window
local verdict, wait = 'ok', 0
if redis.call('ZSCORE', KEYS[1], ARGV[5]) or redis.call('ZSCORE', KEYS[3], ARGV[5]) then
  -- Already counted: a retry of this call, which ran but whose answer was lost. Admit it again, count nothing.
elseif concurrent > 0 and redis.call('ZCARD', KEYS[3]) >= concurrent then
  verdict, wait = 'concurrent', 1000
elseif rpm > 0 and requests >= rpm then
  verdict, wait = 'rpm', oldest_request + window - now
elseif tpm > 0 and tokens >= tpm then
  verdict, wait = 'tpm', window
  local left = tokens
  for i = 1, #spent, 2 do
    left = left - tonumber(string.match(spent[i], ':(%d+)$'))
    if left < tpm then wait = tonumber(spent[i + 1]) + window - now break end
  end
else
  redis.call('ZADD', KEYS[1], now, ARGV[5])
  redis.call('PEXPIRE', KEYS[1], window)
  if requests == 0 then oldest_request = now end
  requests = requests + 1
  if concurrent > 0 then
    redis.call('ZADD', KEYS[3], now, ARGV[5])
    redis.call('PEXPIRE', KEYS[3], ARGV[6])
  end
end
return {verdict, wait, requests, oldest_request + window - now, tokens, oldest_tokens + window - now}
"""

# KEYS: in flight, tokens. ARGV: lease id, tokens used, window ms.
RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1] .. ':' .. ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
"""


class LimitStoreUnavailable(ApiError):
    """Redis, which holds the shared limits, cannot be reached and RATE_LIMIT_REDIS_FAILURE is closed."""

    status = 503
    code = "rate_limit_store_unavailable"

    def __init__(self):
        super().__init__("The rate-limit store (Redis) cannot be reached, and this gateway refuses requests it "
                         "cannot count; retry shortly", headers={"Retry-After": "1"})


class SharedRateLimiter(LimitTable):
    """The RateLimiter's interface (acquire, release), with the counts in Redis."""

    def __init__(self, url, default, overrides=None, window_s=WINDOW_S, failure="open", errors=None,
                 prefix="gateway:ratelimit", clock=time.monotonic):
        import redis  # only gateways that share limits need it
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        super().__init__(default, overrides)
        # One immediate retry: the first call after Redis restarted meets a dead pooled connection.
        self.redis = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                                          retry=Retry(NoBackoff(), 1))
        self.store_error = redis.RedisError
        self._acquire = self.redis.register_script(ACQUIRE)
        self._release = self.redis.register_script(RELEASE)
        self.window_ms = int(window_s * 1000)
        self.failure = failure
        self.errors = errors  # a counter of failed calls to Redis, if given
        self.prefix = prefix
        self.clock = clock  # when to try Redis again and to warn again (the window itself runs on Redis's clock)
        self._skip_until = 0.0
        self._warned_at = float("-inf")
        # Releases that failed while Redis was away, sent again once it answers: else a client's concurrency
        # slot would stay taken until LEASE_TTL_S.
        self._unreleased = deque(maxlen=100_000)

    def _keys(self, client):
        # The {client} hash tag keeps a client's keys in one slot of a Redis Cluster, as a script needs.
        base = f"{self.prefix}:{{{client}}}"
        return [f"{base}:requests", f"{base}:tokens", f"{base}:in_flight"]

    def acquire(self, client: str) -> Lease:
        """Admit one request of client and count it in Redis, or raise RateLimited saying which limit it hit."""
        limits = self.limits_for(client)
        if self.clock() < self._skip_until:
            return self._without_store(client)
        lease_id = uuid.uuid4().hex
        try:
            if self._unreleased:
                self._release_again()  # first: a slot freed while Redis was away is free for this request
        except self.store_error as error:
            self._failed(error)
            return self._without_store(client)
        try:
            verdict, wait, requests, requests_reset, tokens, tokens_reset = self._acquire(
                keys=self._keys(client), args=[self.window_ms, limits.rpm, limits.tpm, limits.concurrent, lease_id,
                                               int(LEASE_TTL_S * 1000)])
        except self.store_error as error:
            # The script may have run and only its answer been lost: free the slot it may hold once Redis answers,
            # or a client with concurrent=1 is locked out until LEASE_TTL_S.
            if limits.concurrent:
                self._unreleased.append(self._release_call(client, lease_id, 0))
            self._failed(error)
            return self._without_store(client)
        rate = RateState(limits, requests, requests_reset / 1000, tokens, tokens_reset / 1000)
        if verdict != b"ok":
            raise refusal(client, limits, verdict.decode(), wait / 1000, rate)
        return Lease(client, rate, holds_slot=bool(limits.concurrent), lease_id=lease_id)

    def release(self, lease: Lease, tokens: int = 0):
        """End an admitted request: free its slot and count its tokens, in Redis (nothing to do for a request
        admitted without the store)."""
        tokens = tokens if self.limits_for(lease.client).tpm else 0
        if lease.lease_id is None or not (lease.holds_slot or tokens):
            return
        call = self._release_call(lease.client, lease.lease_id, tokens)
        try:
            self._release(keys=call[0], args=call[1])
        except self.store_error as error:
            self._failed(error)
            self._unreleased.append(call)

    def _release_call(self, client, lease_id, tokens):
        _, spent, in_flight = self._keys(client)
        return [in_flight, spent], [lease_id, tokens, self.window_ms]

    def _release_again(self):
        """Send the releases that failed earlier; a store error leaves the rest queued and propagates."""
        while self._unreleased:
            try:
                keys, args = self._unreleased.popleft()
            except IndexError:  # another thread took the last one
                return
            try:
                self._release(keys=keys, args=args)
            except self.store_error:
                self._unreleased.appendleft((keys, args))
                raise

    def _without_store(self, client) -> Lease:
        if self.failure == "closed":
            raise LimitStoreUnavailable()
        return Lease(client)

    def _failed(self, error):
        now = self.clock()
        self._skip_until = now + RETRY_S
        if self.errors is not None:
            self.errors.inc()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            served = "serving without the shared limit" if self.failure == "open" else "refusing requests (503)"
            log.warning(f"rate-limit store unreachable: {served}", extra={"fields": {
                "error": type(error).__name__, "failure_mode": self.failure}})
