"""GET /metrics: every metric parses with prometheus_client's parser and moves when its cause happens."""
import threading
import time

import pytest
import requests
from werkzeug import Response

from tests.apps import routed_app
from tests.fakes import LOADING, gated_stream, unused_port_url
from tests.metrics_helpers import scrape, value

CHAT = "/v1/chat/completions"
CHAT_BODY = {"messages": [{"role": "user", "content": "hi"}]}
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def call(client, method, path, **kwargs):
    response = client.open(path, method=method, **kwargs)
    response.close()  # as waitress does: the request's metrics are taken when its body is closed
    return response


@pytest.fixture
def keyed(make_app, httpserver):
    def build(**settings):
        return make_app(httpserver.url_for("").rstrip("/"), OPENAI_API_KEYS="key-a:team_a,key-b:team_b",
                        **settings).test_client()
    return build


TEAM_A = {"Authorization": "Bearer key-a"}


def test_requests_latency_tokens_and_in_flight(keyed, httpserver):
    client = keyed()
    httpserver.expect_request(CHAT).respond_with_json({"object": "chat.completion", "usage": USAGE})
    for _ in range(2):
        assert call(client, "POST", CHAT, json=CHAT_BODY, headers=TEAM_A).status_code == 200
    call(client, "GET", "/v1/no-such-route/abc", headers=TEAM_A)
    call(client, "GET", "/v1/models")  # no key: 401
    samples = scrape(client)
    assert value(samples, "gateway_requests_total", route=CHAT, status="200", client="team_a") == 2
    assert value(samples, "gateway_requests_total", route="unmatched", status="404", client="team_a") == 1
    assert value(samples, "gateway_requests_total", route="/v1/models", status="401", client="none") == 1
    assert value(samples, "gateway_request_duration_seconds_count", route=CHAT) == 2
    assert value(samples, "gateway_upstream_duration_seconds_count", route=CHAT) == 2
    assert value(samples, "gateway_tokens_total", client="team_a", kind="prompt") == 22
    assert value(samples, "gateway_tokens_total", client="team_a", kind="completion") == 14
    assert value(samples, "gateway_in_flight_requests") == 1  # the scrape itself
    assert value(samples, "gateway_upstream_up") == 1
    assert value(samples, "gateway_build_info") == 1
    # Routes are URL rules, never raw paths.
    routes = {labels["route"] for labels, _ in samples["gateway_requests_total"]}
    assert routes == {CHAT, "unmatched", "/v1/models"}


@pytest.mark.parametrize("setup, kind", [
    (lambda server: server.expect_request(CHAT).respond_with_json({"error": {"message": "x"}}, status=500), "5xx"),
    (lambda server: server.expect_request(CHAT).respond_with_data("<html>", content_type="text/html"), "bad_answer"),
    (lambda server: server.expect_request(CHAT).respond_with_json(LOADING, status=503), "loading"),
])
def test_upstream_errors_by_kind(fake_client, httpserver, setup, kind):
    setup(httpserver)
    call(fake_client, "POST", CHAT, json=CHAT_BODY)
    samples = scrape(fake_client)
    assert value(samples, "gateway_upstream_errors_total", kind=kind) == 1
    assert value(samples, "gateway_upstream_errors_total") == 1


def test_refused_upstream_counts_and_goes_down(make_app):
    client = make_app(unused_port_url()).test_client()
    call(client, "POST", CHAT, json=CHAT_BODY)
    samples = scrape(client)
    assert value(samples, "gateway_upstream_errors_total", kind="refused") == 1
    assert value(samples, "gateway_upstream_retries_total") == 2
    assert value(samples, "gateway_upstream_up") == 0


def test_timeouts_and_retries(make_app, httpserver):
    release = threading.Event()
    httpserver.expect_oneshot_request(CHAT).respond_with_json(LOADING, status=503)
    httpserver.expect_oneshot_request(CHAT).respond_with_json({"object": "chat.completion"})
    httpserver.expect_request(CHAT).respond_with_handler(lambda request: release.wait(3) and Response("{}"))
    client = make_app(httpserver.url_for("").rstrip("/"), CHAT_READ_TIMEOUT_S="0.2").test_client()
    try:
        assert call(client, "POST", CHAT, json=CHAT_BODY).status_code == 200
        assert call(client, "POST", CHAT, json=CHAT_BODY).status_code == 504
    finally:
        release.set()
    samples = scrape(client)
    assert value(samples, "gateway_upstream_retries_total") == 1
    assert value(samples, "gateway_upstream_errors_total", kind="timeout") == 1


def test_rate_limit_rejections_by_client_and_limit(keyed, httpserver):
    httpserver.expect_request("/tokenize").respond_with_json({"tokens": [1]})
    client = keyed(RATE_LIMIT_RPM="1")
    for _ in range(3):  # a call that counts against the limit (model listings do not)
        call(client, "POST", "/tokenize", headers=TEAM_A, json={"content": "hi"})
    samples = scrape(client)
    assert value(samples, "gateway_rate_limited_total", client="team_a", limit="rpm") == 2
    assert value(samples, "gateway_rate_limited_total", client="team_b") == 0


def test_stream_gauges_and_time_to_first_token(make_app, httpserver, live_gateway):
    release = threading.Event()
    httpserver.expect_request(CHAT).respond_with_handler(gated_stream(
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\ndata: [DONE]\n\n', release))
    app = make_app(httpserver.url_for("").rstrip("/"))
    base = live_gateway(app)
    response = requests.post(base + CHAT, json={**CHAT_BODY, "stream": True}, stream=True, timeout=10)
    chunks = response.iter_content(None)
    try:
        next(chunks)
        during = scrape(app.test_client())
        assert value(during, "gateway_open_streams") == 1
        assert value(during, "gateway_in_flight_requests") == 2  # the stream and the scrape
    finally:
        release.set()
    assert b"".join(chunks).endswith(b"[DONE]\n\n")
    response.close()
    # The request is counted when waitress closes its response, just after the client has read it.
    deadline = time.monotonic() + 5
    while value(after := scrape(app.test_client()), "gateway_requests_total", route=CHAT) < 1:
        assert time.monotonic() < deadline, "the stream was never counted"
        time.sleep(0.01)
    assert value(after, "gateway_time_to_first_token_seconds_count", route=CHAT) == 1
    assert 0 < value(after, "gateway_time_to_first_token_seconds_sum", route=CHAT) <= value(
        after, "gateway_request_duration_seconds_sum", route=CHAT)
    assert value(after, "gateway_open_streams") == 0
    assert value(after, "gateway_tokens_total", client="anonymous", kind="completion") == 1


@pytest.mark.llama
def test_upstream_llamacpp_metrics_can_be_included(make_app, llama):
    included = scrape(make_app(llama.url, METRICS_INCLUDE_UPSTREAM="1").test_client())
    assert "llamacpp:prompt_tokens_total" in included
    assert "gateway_requests_total" in included or "gateway_build_info" in included
    assert "llamacpp:prompt_tokens_total" not in scrape(make_app(llama.url).test_client())


def test_unreachable_upstream_metrics_do_not_break_the_scrape(make_app):
    samples = scrape(make_app(unused_port_url(), METRICS_INCLUDE_UPSTREAM="1").test_client())
    assert value(samples, "gateway_build_info") == 1


def test_llamacpp_metrics_of_several_replicas_carry_model_and_replica(make_app, fake_upstreams):
    first, second = fake_upstreams(2)
    first.expect_request("/metrics").respond_with_data("# TYPE llamacpp:requests_processing gauge\n"
                                                       "llamacpp:requests_processing 2\n")
    second.expect_request("/metrics").respond_with_data("# TYPE llamacpp:requests_processing gauge\n"
                                                        "llamacpp:requests_processing 5\n")
    urls = [first.url_for("").rstrip("/"), second.url_for("").rstrip("/")]
    app = routed_app(make_app, {"chat": urls, "embed": [unused_port_url()]}, METRICS_INCLUDE_UPSTREAM="1")
    samples = scrape(app.test_client())
    assert sorted(samples["llamacpp:requests_processing"], key=lambda s: s[1]) == [
        ({"model": "chat", "replica": urls[0]}, 2.0), ({"model": "chat", "replica": urls[1]}, 5.0)]
