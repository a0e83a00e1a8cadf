"""Limits shared through a real Redis by real gateway processes (bin/serve): one limit per client however the
requests are spread and raced across gateways, and what each gateway does while Redis is gone."""
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis
import requests
from werkzeug import Response

from service.policy.shared_limits import RETRY_S
from tests.fakes import gated_stream
from tests.processes import ServeProcess, posix_only

CHAT = "/v1/chat/completions"
KEY = {"Authorization": "Bearer k1"}  # OPENAI_API_KEY's client id is "default"
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION, JSON = '{"choices": [], "usage": {}}', "application/json"


@contextlib.contextmanager
def gateways(redis_server, httpserver, *failure_modes, **settings):
    """One bin/serve per failure mode, all in front of httpserver and sharing redis_server; each must stop cleanly."""
    common = dict(LLAMA_SERVER_URL=httpserver.url_for("").rstrip("/"), OPENAI_API_KEY="k1",
                  RATE_LIMIT_REDIS_URL=redis_server.url, **settings)
    started = [ServeProcess(**common, RATE_LIMIT_REDIS_FAILURE=failure) for failure in failure_modes]
    try:
        for gateway in started:  # they start side by side; this waits for the slowest
            gateway.wait_for_event("ready")
        yield [gateway.url for gateway in started]
    finally:
        for gateway in started:
            assert gateway.stop() == 0


def chat_status(base) -> int:
    """POST one chat request to a gateway; its status."""
    return requests.post(base + CHAT, timeout=10, headers=KEY, json=CHAT_BODY).status_code


@posix_only
def test_two_gateway_processes_enforce_one_limit(redis_server, httpserver):
    httpserver.expect_request(CHAT).respond_with_json({"choices": [], "usage": {}})
    with gateways(redis_server, httpserver, "open", "closed", RATE_LIMIT_RPM="10") as (open_url, closed_url):
        statuses = [chat_status((open_url, closed_url)[i % 2]) for i in range(20)]
        assert statuses.count(200) == 10 and statuses.count(429) == 10  # 10 in all, not 10 each
        redis_server.stop()
        assert chat_status(open_url) == 200  # fail-open: served without the limit
        refused = requests.post(closed_url + CHAT, headers=KEY, json={"model": "m", "messages": []}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "rate_limit_store_unavailable"
        assert refused.headers["Retry-After"] == "1"
        metrics = requests.get(open_url + "/metrics", timeout=10).text
        assert "gateway_rate_limit_store_errors_total 1.0" in metrics
        redis_server.start()
        time.sleep(RETRY_S)  # the gateways leave Redis alone that long after it failed
        statuses = [chat_status((open_url, closed_url)[i % 2]) for i in range(12)]
        assert statuses == [200] * 10 + [429] * 2  # both enforce the shared limit again, no restart


@posix_only
def test_requests_raced_across_two_gateways_are_admitted_exactly_up_to_the_limit(redis_server, httpserver):
    httpserver.expect_request(CHAT).respond_with_json({"choices": [], "usage": {}})
    senders = 24  # three times each gateway's 8 waitress threads: many checks meet in Redis at once
    together = threading.Barrier(senders)

    def send(urls, i):
        together.wait(10)
        return chat_status(urls[i % 2])

    with gateways(redis_server, httpserver, "closed", "closed", RATE_LIMIT_RPM="5") as urls:
        with ThreadPoolExecutor(senders) as pool:
            statuses = list(pool.map(lambda i: send(urls, i), range(senders)))
    assert statuses.count(200) == 5 and statuses.count(429) == senders - 5


@posix_only
def test_one_concurrency_slot_is_shared_by_two_gateways(redis_server, httpserver):
    release = threading.Event()
    held = gated_stream(b'data: {"choices":[]}\n\n', b"data: [DONE]\n\n", release)
    httpserver.expect_request(CHAT).respond_with_handler(
        lambda request: held(request) if request.json.get("stream") else Response(COMPLETION, mimetype=JSON))
    in_flight = redis.Redis.from_url(redis_server.url)
    with gateways(redis_server, httpserver, "closed", "closed", RATE_LIMIT_CONCURRENT="1") as (first, second):
        stream = requests.post(first + CHAT, json={**CHAT_BODY, "stream": True}, headers=KEY, stream=True, timeout=10)
        try:
            assert stream.status_code == 200
            next(stream.iter_content(None))  # admitted, and held open by the upstream
            refused = requests.post(second + CHAT, json=CHAT_BODY, headers=KEY, timeout=10)
            assert refused.status_code == 429 and "1 requests in flight" in refused.json()["error"]["message"]
        finally:
            release.set()
            stream.close()
        # The first gateway frees the slot once waitress has closed the finished stream: wait for that in Redis.
        deadline = time.monotonic() + 10
        while in_flight.zcard("gateway:ratelimit:{default}:in_flight") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert chat_status(second) == 200
