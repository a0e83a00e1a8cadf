"""Limits shared through a real Redis: one limit per client across limiters, what happens while Redis is gone
(fail-open or fail-closed) or answers late, and after it is back. Gateway processes: test_shared_limits_http."""
import logging
import time

import pytest
import redis

from service.families import OPENAI
from service.policy import shared_limits
from service.policy.limits import Limits, RateLimited
from service.policy.shared_limits import (ACQUIRE, LEASE_TTL_S, RETRY_S, WARN_EVERY_S, LimitStoreUnavailable,
                                          SharedRateLimiter)
from tests.fakes import Clock
from tests.processes import posix_only

# The keys of client "team" under the default prefix: requests, tokens, in flight.
TEAM_KEYS = [f"gateway:ratelimit:{{team}}:{name}" for name in ("requests", "tokens", "in_flight")]


class Count:
    """A stand-in for a prometheus counter."""

    value = 0

    def inc(self):
        self.value += 1


def limiter(redis_server, window_s=60.0, failure="open", errors=None, clock=time.monotonic, **limits):
    """A SharedRateLimiter on the test's Redis; each one is like another gateway process."""
    return SharedRateLimiter(redis_server.url, Limits(**limits), window_s=window_s, failure=failure, errors=errors,
                             clock=clock)


def store(redis_server) -> redis.Redis:
    """A plain client of the test's Redis, to look at (or age) what the limiters wrote."""
    return redis.Redis.from_url(redis_server.url)


def redis_now_ms(client) -> int:
    """Redis's own clock, which the scripts score by, in milliseconds."""
    seconds, microseconds = client.time()
    return seconds * 1000 + microseconds // 1000


def lose_answers(monkeypatch, shared, count):
    """Make the next count script calls of shared run in Redis but their answers get lost, as on a reply that
    came after the socket timeout (redis-py then closes the connection and retries once)."""
    parse_response = shared.redis.parse_response
    lost = []

    def late(connection, command_name, **options):
        answer = parse_response(connection, command_name, **options)
        if command_name == "EVALSHA" and len(lost) < count:
            lost.append(answer)
            raise redis.TimeoutError("Timeout reading from socket (the test lost this answer)")
        return answer

    monkeypatch.setattr(shared.redis, "parse_response", late)
    return lost


def test_two_limiters_share_one_request_limit(redis_server):
    first, second = limiter(redis_server, rpm=3), limiter(redis_server, rpm=3)
    first.acquire("team"), second.acquire("team")
    lease = first.acquire("team")
    assert OPENAI.rate_headers(lease.rate)["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited) as refused:
        second.acquire("team")
    assert refused.value.limit == "rpm" and 58 <= int(refused.value.headers["Retry-After"]) <= 60
    assert second.acquire("other-team")  # limits are per client


def test_concurrency_and_tokens_are_shared(redis_server):
    first, second = limiter(redis_server, concurrent=1, tpm=100), limiter(redis_server, concurrent=1, tpm=100)
    lease = first.acquire("team")
    with pytest.raises(RateLimited, match="1 requests in flight"):
        second.acquire("team")
    first.release(lease, tokens=100)
    with pytest.raises(RateLimited) as refused:
        second.acquire("team")
    assert refused.value.limit == "tpm" and refused.value.headers_for(OPENAI)["x-ratelimit-remaining-tokens"] == "0"


def test_the_window_slides(redis_server):
    shared = limiter(redis_server, window_s=0.3, rpm=1)
    shared.acquire("team")
    with pytest.raises(RateLimited):
        shared.acquire("team")
    time.sleep(0.35)
    assert OPENAI.rate_headers(shared.acquire("team").rate)["x-ratelimit-remaining-requests"] == "0"


def unreachable_warnings(caplog) -> int:
    """How many "store unreachable" warnings were logged."""
    return len([record for record in caplog.records if "unreachable" in record.getMessage()])


def test_redis_gone_fails_open_or_closed_and_its_return_is_picked_up(redis_server, caplog):
    errors, clock = Count(), Clock()
    open_limiter = limiter(redis_server, errors=errors, clock=clock, rpm=1)
    closed_limiter = limiter(redis_server, failure="closed", clock=clock, rpm=1)
    open_limiter.acquire("team")
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="service.policy.shared_limits"):
        assert [open_limiter.acquire("team").rate for _ in range(3)] == [None, None, None]  # served, uncounted
        assert errors.value == 1 and unreachable_warnings(caplog) == 1  # then Redis is left alone for RETRY_S
        clock.now += RETRY_S
        open_limiter.acquire("team")
        assert errors.value == 2 and unreachable_warnings(caplog) == 1  # tried again and failed: no new warning...
        clock.now += WARN_EVERY_S
        open_limiter.acquire("team")
        assert errors.value == 3 and unreachable_warnings(caplog) == 2  # ...until WARN_EVERY_S has passed
    with pytest.raises(LimitStoreUnavailable) as refused:
        closed_limiter.acquire("team")
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "1"
    redis_server.start()
    clock.now += RETRY_S
    open_limiter.acquire("team")  # the restarted Redis has forgotten the old counts
    for shared in (open_limiter, closed_limiter):
        with pytest.raises(RateLimited):
            shared.acquire("team")


@posix_only
def test_a_release_that_met_no_redis_is_sent_again_when_it_is_back(redis_server, monkeypatch):
    import signal

    monkeypatch.setattr(shared_limits, "REDIS_TIMEOUT_S", 0.2)  # the release below waits it out twice
    clock = Clock()
    shared, other = limiter(redis_server, clock=clock, concurrent=1), limiter(redis_server, concurrent=1)
    lease = shared.acquire("team")
    redis_server.process.send_signal(signal.SIGSTOP)  # unreachable, but its data stays
    try:
        shared.release(lease)  # times out: kept to be sent again
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    with pytest.raises(RateLimited):
        other.acquire("team")  # the slot is still taken in Redis
    clock.now += RETRY_S
    assert shared.acquire("team").holds_slot  # the release went first, so the slot was free


def test_the_acquire_script_counts_a_lease_id_once(redis_server):
    client = store(redis_server)
    window_ms, rpm, tpm, concurrent, ttl_ms = 60000, 5, 0, 1, 60000
    first = client.eval(ACQUIRE, 3, *TEAM_KEYS, window_ms, rpm, tpm, concurrent, "lease-1", ttl_ms)
    again = client.eval(ACQUIRE, 3, *TEAM_KEYS, window_ms, rpm, tpm, concurrent, "lease-1", ttl_ms)
    assert first[:3] == again[:3] == [b"ok", 0, 1]  # admitted both times, counted once
    assert client.zcard(TEAM_KEYS[2]) == 1
    other = client.eval(ACQUIRE, 3, *TEAM_KEYS, window_ms, rpm, tpm, concurrent, "lease-2", ttl_ms)
    assert other[0] == b"concurrent"


def test_an_answer_that_came_late_does_not_refuse_its_own_retry(redis_server, monkeypatch):
    shared, other = limiter(redis_server, concurrent=1), limiter(redis_server, concurrent=1)
    lost = lose_answers(monkeypatch, shared, 1)
    lease = shared.acquire("team")  # the first call ran and took the slot; redis-py's retry finds it taken by itself
    assert len(lost) == 1 and lease.holds_slot and lease.lease_id is not None
    assert store(redis_server).zcard(TEAM_KEYS[2]) == 1
    shared.release(lease)
    assert other.acquire("team").holds_slot


def test_an_acquire_whose_outcome_is_unknown_frees_its_slot_later(redis_server, monkeypatch):
    clock = Clock()
    shared, other = limiter(redis_server, clock=clock, concurrent=1), limiter(redis_server, concurrent=1)
    lose_answers(monkeypatch, shared, 2)  # the call and its retry both ran, and both answers were lost
    lease = shared.acquire("team")
    assert lease.lease_id is None  # served open, without a lease to release...
    with pytest.raises(RateLimited):
        other.acquire("team")  # ...though Redis counted it
    clock.now += RETRY_S
    assert shared.acquire("team").holds_slot  # the slot was released first, not held until LEASE_TTL_S


def test_a_slot_held_past_the_lease_ttl_is_freed(redis_server):
    # A gateway that died mid-request never releases its slot: it counts for LEASE_TTL_S, then frees itself.
    shared, client = limiter(redis_server, concurrent=1), store(redis_server)
    lease = shared.acquire("team")
    assert LEASE_TTL_S * 1000 - 60000 < client.pttl(TEAM_KEYS[2]) <= LEASE_TTL_S * 1000  # no key outlives its leases
    started = redis_now_ms(client) - LEASE_TTL_S * 1000
    client.zadd(TEAM_KEYS[2], {lease.lease_id: started + 5000})  # began almost LEASE_TTL_S ago: still counted
    with pytest.raises(RateLimited):
        shared.acquire("team")
    client.zadd(TEAM_KEYS[2], {lease.lease_id: started - 1000})  # began over LEASE_TTL_S ago: counted as lost
    assert shared.acquire("team").holds_slot


def test_every_key_expires_with_the_window_so_no_client_leaves_keys_behind(redis_server):
    # A pair of keys per client that ever called: without an expiry they would stay in Redis for ever.
    window_s = 60.0
    shared, client = limiter(redis_server, window_s=window_s, rpm=10, tpm=1000), store(redis_server)
    lease = shared.acquire("team")
    assert 0 < client.pttl(TEAM_KEYS[0]) <= window_s * 1000  # requests
    assert client.exists(TEAM_KEYS[1]) == 0  # no tokens spent yet
    shared.release(lease, tokens=7)
    assert 0 < client.pttl(TEAM_KEYS[1]) <= window_s * 1000  # tokens
    assert 0 < client.pttl(TEAM_KEYS[0]) <= window_s * 1000
