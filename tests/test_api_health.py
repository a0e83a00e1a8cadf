"""GET /health: ok or degraded (200) while llama-server can serve; down (503, saying why) otherwise; cached."""
import queue
import threading

import pytest
from werkzeug import Response

from service import __version__
from tests.apps import routed_app
from tests.clients import assert_openai_envelope
from tests.fakes import COMPLETION, LOADING, unused_port_url
from tests.metrics_helpers import scrape, value

LLAMA_METRICS = "llamacpp:requests_processing {busy}\nllamacpp:requests_deferred {queued}\n"


@pytest.mark.llama
def test_ok_against_real_llama(llama_client, llama):
    response = llama_client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["upstream"]["url"] == llama.url and body["upstream"]["status"] == "ok"
    assert body["upstream"]["requests_processing"] == 0 and body["upstream"]["requests_deferred"] == 0


def test_loading_is_503_down_and_not_retried(fake_client, httpserver):
    httpserver.expect_request("/health").respond_with_json(LOADING, status=503)
    response = fake_client.get("/health")
    error = assert_envelope_with_status(response)
    assert "Loading model" in error["message"]
    assert response.get_json()["upstream"]["status"] == "loading"
    assert response.headers["Retry-After"]
    assert len(httpserver.log) == 1  # health answers at once: no retries


def assert_envelope_with_status(response):
    body = response.get_json()
    assert response.status_code == 503 and body["status"] == "down"
    return assert_openai_envelope(response, 503)


def test_refused_is_503(make_app):
    response = make_app(unused_port_url()).test_client().get("/health")
    assert "connection refused" in assert_envelope_with_status(response)["message"]
    assert response.get_json()["upstream"]["status"] == "unreachable"


def test_timed_out_is_503(make_app, httpserver):
    release = threading.Event()
    httpserver.expect_request("/health").respond_with_handler(lambda request: release.wait(5) and Response("{}"))
    client = make_app(httpserver.url_for("").rstrip("/"), MODELS_READ_TIMEOUT_S="0.2").test_client()
    try:
        response = client.get("/health")
    finally:
        release.set()
    assert "did not answer" in assert_envelope_with_status(response)["message"]


def test_queued_requests_mean_degraded_but_serving(fake_client, httpserver):
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    httpserver.expect_request("/metrics").respond_with_data(LLAMA_METRICS.format(busy=2, queued=3))
    response = fake_client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "degraded"
    assert body["upstream"]["requests_processing"] == 2 and body["upstream"]["requests_deferred"] == 3


def test_upstream_without_metrics_is_plain_ok(fake_client, httpserver):
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    httpserver.expect_request("/metrics").respond_with_json({"error": {"message": "no metrics"}}, status=501)
    body = fake_client.get("/health").get_json()
    assert body["status"] == "ok" and "requests_deferred" not in body["upstream"]


def test_polling_is_served_from_the_cache(make_app, httpserver):
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    httpserver.expect_request("/metrics").respond_with_data(LLAMA_METRICS.format(busy=0, queued=0))
    cached = make_app(httpserver.url_for("").rstrip("/"), HEALTH_CACHE_S="60").test_client()
    for _ in range(20):
        assert cached.get("/health").status_code == 200
    assert len([e for e in httpserver.log if e[0].path == "/health"]) == 1
    uncached = make_app(httpserver.url_for("").rstrip("/"), HEALTH_CACHE_S="0").test_client()
    for _ in range(3):
        uncached.get("/health")
    assert len([e for e in httpserver.log if e[0].path == "/health"]) == 4


def test_health_needs_no_key_and_reports_no_secret(make_app, httpserver):
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    client = make_app(httpserver.url_for("").rstrip("/"), OPENAI_API_KEY="sekrit-key").test_client()
    response = client.get("/health")
    assert response.status_code == 200 and "sekrit" not in response.get_data(as_text=True)


def test_routed_health_reports_each_model_and_replica(make_app, fake_upstreams):
    chat_a, chat_b, embed = fake_upstreams(3)
    for up in (chat_a, chat_b):
        up.expect_request("/health").respond_with_json({"status": "ok"})
    chat_b.expect_request("/metrics").respond_with_data(LLAMA_METRICS.format(busy=2, queued=1))
    embed.expect_request("/health").respond_with_json(LOADING, status=503)
    app = routed_app(make_app, {"chat": [chat_a.url_for(""), chat_b.url_for("")], "embed": [embed.url_for("")]})
    response = app.test_client().get("/health")
    assert response.status_code == 200
    report = response.get_json()
    assert report["status"] == "degraded"
    assert report["models"]["chat"]["status"] == "degraded"  # serving, with requests queued on one replica
    first, second = report["models"]["chat"]["replicas"]
    assert first["status"] == "ok" and first["in_flight"] == 0 and not first["ejected"]
    assert second["requests_deferred"] == 1 and second["url"] == chat_b.url_for("").rstrip("/")
    assert report["models"]["embed"] == {"status": "down", "replicas": [
        {"url": embed.url_for("").rstrip("/"), "status": "loading", "reason": "llama-server cannot serve yet: "
         "Loading model", "in_flight": 0, "ejected": False}]}


def test_routed_health_is_503_only_when_no_model_can_serve(make_app):
    app = routed_app(make_app, {"chat": [unused_port_url()], "embed": [unused_port_url()]})
    response = app.test_client().get("/health")
    assert_envelope_with_status(response)
    assert response.get_json()["models"]["chat"]["status"] == "down"


def gated_health(gate, arrived, probes):
    """A /health handler that counts its calls, says when one arrived, and answers once gate is set."""
    def handle(request):
        probes.append(request.path)
        arrived.set()
        gate.wait(10)
        return Response('{"status": "ok"}', content_type="application/json")
    return handle


def get_health_in_threads(app, n, answers):
    """n threads, each GETting /health once and putting (status, body) into answers."""
    def get():
        response = app.test_client().get("/health")
        answers.put((response.status_code, response.get_json()))
    threads = [threading.Thread(target=get, name="health-caller", daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    return threads


def test_callers_get_the_cached_report_at_once_while_one_refreshes_it(make_app, httpserver):
    gate, arrived, probes = threading.Event(), threading.Event(), []
    gate.set()
    httpserver.expect_request("/health").respond_with_handler(gated_health(gate, arrived, probes))
    httpserver.expect_request("/metrics").respond_with_data(LLAMA_METRICS.format(busy=0, queued=0))
    app = make_app(httpserver.url_for("").rstrip("/"), HEALTH_CACHE_S="0", MODELS_READ_TIMEOUT_S="4")
    first = app.test_client().get("/health").get_json()
    assert first["status"] == "ok" and first["age_s"] == 0  # just made
    gate.clear(), arrived.clear()
    answers = queue.Queue()
    threads = get_health_in_threads(app, 10, answers)
    try:
        # Nine answer while llama.cpp still holds the tenth caller's probe: from the cache, saying its age.
        early = [answers.get(timeout=2) for _ in range(9)]
        assert arrived.wait(5) and answers.empty()
    finally:
        gate.set()
    for thread in threads:
        thread.join(5)
    status, fresh = answers.get(timeout=1)
    assert status == 200 and fresh["age_s"] == 0  # the refresher's own
    assert len(probes) == 2  # the first report, and one refresh for ten callers
    for status, body in early:
        assert status == 200 and body.pop("age_s") >= 0
        assert body == {key: value for key, value in first.items() if key != "age_s"}


def test_the_first_report_is_waited_for_once_by_every_caller(make_app, httpserver):
    gate, arrived, probes = threading.Event(), threading.Event(), []
    httpserver.expect_request("/health").respond_with_handler(gated_health(gate, arrived, probes))
    httpserver.expect_request("/metrics").respond_with_data(LLAMA_METRICS.format(busy=0, queued=0))
    app = make_app(httpserver.url_for("").rstrip("/"), HEALTH_CACHE_S="60")
    answers = queue.Queue()
    threads = get_health_in_threads(app, 5, answers)
    assert arrived.wait(5)
    gate.set()
    for thread in threads:
        thread.join(5)
    bodies = [answers.get(timeout=1) for _ in threads]
    assert {status for status, _ in bodies} == {200} and probes == ["/health"]


def test_each_refresh_sets_the_up_gauge(make_app, httpserver):
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    client = make_app(httpserver.url_for("").rstrip("/"), HEALTH_CACHE_S="0").test_client()
    assert client.get("/health").status_code == 200
    assert value(scrape(client), "gateway_upstream_up") == 1
    httpserver.clear()
    httpserver.expect_request("/health").respond_with_json(LOADING, status=503)
    assert client.get("/health").status_code == 503
    assert value(scrape(client), "gateway_upstream_up") == 0


def test_waiting_for_the_first_report_ends_with_its_probes_timeout(make_app, httpserver):
    gate, arrived, probes = threading.Event(), threading.Event(), []
    httpserver.expect_request("/health").respond_with_handler(gated_health(gate, arrived, probes))
    app = make_app(httpserver.url_for("").rstrip("/"), HEALTH_CACHE_S="60", MODELS_READ_TIMEOUT_S="0.3")
    answers = queue.Queue()
    threads = get_health_in_threads(app, 5, answers)
    try:
        bodies = [answers.get(timeout=3) for _ in threads]  # all at the one probe's read timeout
    finally:
        gate.set()
        for thread in threads:
            thread.join(5)
    assert {status for status, _ in bodies} == {503} and probes == ["/health"]
    assert all("did not answer" in body["error"]["message"] for _, body in bodies)


# --- GET / and HEAD /: the base URL clients probe ---

@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_the_base_url_answers_without_a_key_and_outside_the_limits(make_app, httpserver, method):
    # Claude Code sends HEAD / with no key before anything else; a load balancer may probe it as often as it likes.
    httpserver.expect_request("/v1/chat/completions").respond_with_json(COMPLETION)
    client = make_app(httpserver.url_for("").rstrip("/"), OPENAI_API_KEY="k", RATE_LIMIT_RPM="1").test_client()
    for _ in range(3):
        response = client.open("/", method=method)
        assert response.status_code == 200 and response.mimetype == "application/json"
    assert client.get("/").get_json() == {"name": "llama.cpp gateway", "version": __version__, "api": "/v1",
                                          "openapi": "/openapi.json", "health": "/health"}
    # llama.cpp is not asked (an earlier test's /health probe may still arrive late on the shared fake upstream).
    assert [request.path for request, _ in httpserver.log if request.path != "/health"] == []
    # The key's one request a minute is still there: the probes did not count.
    chat = client.post("/v1/chat/completions", headers={"Authorization": "Bearer k"}, json={"messages": [
        {"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.get_data(as_text=True)


def test_the_base_url_takes_only_get_and_head(fake_client, httpserver):
    error = assert_openai_envelope(fake_client.post("/", json={}), 405)
    assert "use GET" in error["message"]
    assert httpserver.log == []
