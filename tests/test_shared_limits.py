"""Limits shared through a real Redis: one limit per client across limiters and across gateway processes, and
what happens while Redis is gone (fail-open or fail-closed) and after it is back."""
import logging
import time

import pytest
import requests

from service.limits import Limits, RateLimited
from service.shared_limits import RETRY_S, LimitStoreUnavailable, SharedRateLimiter
from tests.test_serve import ServeProcess, posix_only


class Count:
    """A stand-in for a prometheus counter."""

    value = 0

    def inc(self):
        self.value += 1


def limiter(redis_server, window_s=60.0, failure="open", errors=None, **limits):
    """A SharedRateLimiter on the test's Redis; each one is like another gateway process."""
    return SharedRateLimiter(redis_server.url, Limits(**limits), window_s=window_s, failure=failure, errors=errors)


def test_two_limiters_share_one_request_limit(redis_server):
    first, second = limiter(redis_server, rpm=3), limiter(redis_server, rpm=3)
    first.acquire("team"), second.acquire("team")
    lease = first.acquire("team")
    assert lease.headers["x-ratelimit-remaining-requests"] == "0"
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
    assert refused.value.limit == "tpm" and refused.value.headers["x-ratelimit-remaining-tokens"] == "0"


def test_the_window_slides(redis_server):
    shared = limiter(redis_server, window_s=0.3, rpm=1)
    shared.acquire("team")
    with pytest.raises(RateLimited):
        shared.acquire("team")
    time.sleep(0.35)
    assert shared.acquire("team").headers["x-ratelimit-remaining-requests"] == "0"


def test_redis_gone_fails_open_or_closed_and_its_return_is_picked_up(redis_server, caplog):
    errors = Count()
    open_limiter = limiter(redis_server, errors=errors, rpm=1)
    closed_limiter = limiter(redis_server, failure="closed", rpm=1)
    open_limiter.acquire("team")
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="service.shared_limits"):
        assert [open_limiter.acquire("team").headers for _ in range(3)] == [{}, {}, {}]  # served, uncounted
    assert errors.value == 1  # then Redis is left alone for RETRY_S
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1
    with pytest.raises(LimitStoreUnavailable):
        closed_limiter.acquire("team")
    redis_server.start()
    time.sleep(RETRY_S)
    open_limiter.acquire("team")  # the restarted Redis has forgotten the old counts
    for shared in (open_limiter, closed_limiter):
        with pytest.raises(RateLimited):
            shared.acquire("team")


def test_a_release_that_met_no_redis_is_sent_again_when_it_is_back(redis_server):
    import signal

    shared, other = limiter(redis_server, concurrent=1), limiter(redis_server, concurrent=1)
    lease = shared.acquire("team")
    redis_server.process.send_signal(signal.SIGSTOP)  # unreachable, but its data stays
    try:
        shared.release(lease)  # times out: kept to be sent again
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    with pytest.raises(RateLimited):
        other.acquire("team")  # the slot is still taken in Redis
    time.sleep(RETRY_S)
    assert shared.acquire("team").holds_slot  # the release went first, so the slot was free


def chat_status(base) -> int:
    """POST one chat request to a gateway; its status."""
    return requests.post(base + "/v1/chat/completions", timeout=10, headers={"Authorization": "Bearer k1"},
                         json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}).status_code


@posix_only
def test_two_gateway_processes_enforce_one_limit(redis_server, httpserver):
    httpserver.expect_request("/v1/chat/completions").respond_with_json({"choices": [], "usage": {}})
    common = dict(LLAMA_SERVER_URL=httpserver.url_for("").rstrip("/"), OPENAI_API_KEY="k1", RATE_LIMIT_RPM="10",
                  RATE_LIMIT_REDIS_URL=redis_server.url)
    gateways = [ServeProcess(**common), ServeProcess(**common, RATE_LIMIT_REDIS_FAILURE="closed")]
    try:
        for gateway in gateways:
            gateway.wait_for_event("ready")
        statuses = [chat_status(gateways[i % 2].url) for i in range(20)]
        assert statuses.count(200) == 10 and statuses.count(429) == 10  # 10 in all, not 10 each
        redis_server.stop()
        assert chat_status(gateways[0].url) == 200  # fail-open: served without the limit
        refused = requests.post(gateways[1].url + "/v1/chat/completions", headers={"Authorization": "Bearer k1"},
                                json={"model": "m", "messages": []}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "rate_limit_store_unavailable"
        metrics = requests.get(gateways[0].url + "/metrics", timeout=10).text
        assert "gateway_rate_limit_store_errors_total 1.0" in metrics
        redis_server.start()
        time.sleep(RETRY_S)
        statuses = [chat_status(gateways[i % 2].url) for i in range(12)]
        assert statuses == [200] * 10 + [429] * 2  # both enforce the shared limit again, no restart
    finally:
        for gateway in gateways:
            assert gateway.stop() == 0
