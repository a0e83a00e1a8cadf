"""The limiter: sliding windows at their edges, token counts, concurrency under threads, eviction, headers."""
import threading

import pytest

from service.config import ConfigError, load_settings
from service.families import OPENAI
from service.families.catalog import duration
from service.policy.limits import Limits, RateLimited, RateLimiter
from tests.fakes import Clock


@pytest.fixture
def clock():
    return Clock()


def rejected(limiter, client="c") -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        limiter.acquire(client)
    return caught.value


def test_requests_per_window_edges(clock):
    limiter = RateLimiter(Limits(rpm=3), clock=clock)
    for offset in (0.0, 10.0, 20.5):
        clock.now = 1000.0 + offset
        limiter.acquire("c")
    clock.now = 1059.2
    error = rejected(limiter)
    assert error.status == 429 and error.code == "rate_limit_exceeded"
    assert "3 requests per minute" in error.message and "RATE_LIMIT_RPM" in error.message
    assert error.headers["Retry-After"] == "1"  # the first slot frees at 1060.0: 0.8 s, rounded up
    clock.now = 1060.0  # exactly one window after the first request: it has left the window
    limiter.acquire("c")
    error = rejected(limiter)
    assert error.headers["Retry-After"] == "10"  # the 1010.0 request leaves at 1070.0


def test_retry_after_is_at_least_one_second(clock):
    limiter = RateLimiter(Limits(rpm=1), clock=clock)
    limiter.acquire("c")
    clock.now += 59.999
    assert rejected(limiter).headers["Retry-After"] == "1"


def test_clients_are_limited_separately_and_overrides_apply(clock):
    limiter = RateLimiter(Limits(rpm=1), {"vip": {"rpm": 3}}, clock=clock)
    limiter.acquire("a")
    rejected(limiter, "a")
    limiter.acquire("b")
    for _ in range(3):
        limiter.acquire("vip")
    rejected(limiter, "vip")
    assert limiter.limits_for("vip") == Limits(rpm=3)


def test_tokens_per_window(clock):
    limiter = RateLimiter(Limits(tpm=100), clock=clock)
    lease = limiter.acquire("c")
    limiter.release(lease, tokens=60)
    clock.now += 5
    lease = limiter.acquire("c")
    assert OPENAI.rate_headers(lease.rate)["x-ratelimit-remaining-tokens"] == "40"
    limiter.release(lease, tokens=50)  # 110 used: over the limit
    clock.now += 1
    error = rejected(limiter)
    assert "100 tokens per minute" in error.message
    # The first 60 tokens leave at +60 s from their stamp (1000): 54 s from now brings the total to 50.
    assert error.headers["Retry-After"] == "54"
    clock.now = 1060.0
    limiter.acquire("c")


def test_concurrency_under_many_threads(clock):
    limiter = RateLimiter(Limits(concurrent=3))
    admitted, refused, holding = [], [], threading.Barrier(20)

    def worker():
        try:
            lease = limiter.acquire("c")
        except RateLimited as error:
            refused.append(error)
            holding.wait()
            return
        admitted.append(lease)
        holding.wait()  # all threads have tried before anyone releases

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 3 and len(refused) == 17
    assert all("3 requests in flight" in error.message for error in refused)
    for lease in admitted:
        limiter.release(lease)
    limiter.acquire("c")


def test_idle_clients_are_evicted(clock):
    limiter = RateLimiter(Limits(rpm=10), clock=clock)
    for client in range(50):
        limiter.release(limiter.acquire(f"client-{client}"))
    assert limiter.tracked_clients() == 50
    clock.now += 61
    limiter.acquire("fresh")
    assert limiter.tracked_clients() == 1


def test_in_flight_clients_are_not_evicted(clock):
    limiter = RateLimiter(Limits(concurrent=1), clock=clock)
    lease = limiter.acquire("busy")
    clock.now += 120
    limiter.acquire("other")
    rejected(limiter, "busy")
    limiter.release(lease)
    limiter.acquire("busy")


def test_a_request_longer_than_the_window_keeps_its_tokens(clock):
    # A token limit alone (no concurrency limit): the sweep must not forget a client with a request running.
    limiter = RateLimiter(Limits(tpm=100), clock=clock, window_s=10)
    lease = limiter.acquire("c")
    clock.now += 25  # the request runs past the window; meanwhile another client's request sweeps idle clients
    limiter.acquire("other")
    assert limiter.tracked_clients() == 2
    limiter.release(lease, tokens=150)
    error = rejected(limiter)
    assert error.limit == "tpm" and error.headers["Retry-After"] == "10"


def test_each_release_frees_its_slot_once(clock):
    limiter = RateLimiter(Limits(concurrent=1), {"tokens-only": {"concurrent": 0, "tpm": 100}}, clock=clock)
    lease = limiter.acquire("c")
    limiter.release(lease)
    limiter.release(lease)  # a second release of the same lease frees nothing more
    limiter.acquire("c")
    assert rejected(limiter).limit == "concurrent"
    # A client without a concurrency limit is counted in flight too, and its release uncounts it: once idle, it goes.
    limiter.release(limiter.acquire("tokens-only"))
    clock.now += 61
    limiter.acquire("c2")
    assert limiter.tracked_clients() == 2  # "c" (still in flight) and "c2"


def test_headers_and_reset_times(clock):
    limiter = RateLimiter(Limits(rpm=5, tpm=1000), clock=clock)
    first = limiter.acquire("c")
    assert OPENAI.rate_headers(first.rate)["x-ratelimit-limit-requests"] == "5"
    assert OPENAI.rate_headers(first.rate)["x-ratelimit-remaining-requests"] == "4"
    assert OPENAI.rate_headers(first.rate)["x-ratelimit-reset-requests"] == "1m0s"
    assert OPENAI.rate_headers(first.rate)["x-ratelimit-reset-tokens"] == "0ms"
    limiter.release(first, tokens=10)
    clock.now += 45.5
    second = limiter.acquire("c")
    assert OPENAI.rate_headers(second.rate)["x-ratelimit-remaining-requests"] == "3"
    assert OPENAI.rate_headers(second.rate)["x-ratelimit-reset-requests"] == "14.5s"
    assert OPENAI.rate_headers(second.rate)["x-ratelimit-remaining-tokens"] == "990"
    assert OPENAI.rate_headers(second.rate)["x-ratelimit-reset-tokens"] == "14.5s"


def test_no_limits_no_headers_and_inactive():
    limiter = RateLimiter(Limits())
    assert not limiter.active
    assert OPENAI.rate_headers(limiter.acquire("c").rate) == {}


@pytest.mark.parametrize("seconds, text", [(0.02, "20ms"), (0.9999, "1s"), (1, "1s"), (1.5, "1.5s"),
                                           (60, "1m0s"), (90.25, "1m30.25s"), (360, "6m0s")])
def test_duration_format(seconds, text):
    assert duration(seconds) == text


@pytest.mark.parametrize("value, words", [
    ("team_a", "the format is"),
    ("team_a:rpm", "bad limit"),
    ("team_a:rpm=x", "bad limit"),
    ("team_a:rps=5", "bad limit"),
    ("team_a:rpm=-1", "bad limit"),
    ("team_a:rpm=1,team_a:tpm=2", "listed twice"),
    ("bad id!:rpm=1", "bad entry"),
])
def test_rate_limits_parsing(value, words):
    with pytest.raises(ConfigError) as caught:
        load_settings({"RATE_LIMITS": value})
    assert words in str(caught.value)


def test_rate_limits_override_format():
    parsed = load_settings({"RATE_LIMITS": "team_a:rpm=600:tpm=200000, team_b:concurrent=2"})["RATE_LIMITS"]
    assert parsed == {"team_a": {"rpm": 600, "tpm": 200000}, "team_b": {"concurrent": 2}}
