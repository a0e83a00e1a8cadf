"""Graceful shutdown of bin/serve: no new connections, in-flight streams finish within the grace, the rest end
with an error event, exit code 0."""
import http.client
import json
import os
import signal
import threading
import time

import pytest
import requests

from tests.fakes import gated_stream
from tests.processes import ServeProcess

pytestmark = pytest.mark.skipif(os.name != "posix", reason="sends SIGTERM")

CHAT = "/v1/chat/completions"
FIRST = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
LAST = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'


@pytest.fixture
def slow_upstream(httpserver):
    """A fake llama-server whose streams send one event, then wait for release before finishing."""
    release = threading.Event()
    httpserver.expect_request(CHAT).respond_with_handler(gated_stream(FIRST, LAST, release, wait_s=30))
    yield httpserver.url_for("").rstrip("/"), release
    release.set()


@pytest.fixture
def gateway(slow_upstream):
    """Start bin/serve in front of the slow upstream with a shutdown grace; killed at the end whatever happened."""
    started = []

    def start(grace_s):
        serve = ServeProcess(LLAMA_SERVER_URL=slow_upstream[0], SHUTDOWN_GRACE_S=grace_s)
        started.append(serve)
        serve.wait_for_event("ready")
        return serve

    yield start
    for serve in started:
        serve.stop(signal.SIGKILL)


def open_stream(serve):
    response = requests.post(serve.url + CHAT, stream=True, timeout=30, json={
        "stream": True, "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}})
    chunks = response.iter_content(None)
    assert next(chunks) == FIRST
    return response, chunks


# SIGTERM (a service manager) and SIGINT (Ctrl-C at a terminal) stop the gateway alike.
STOP_SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(
    signal.SIGINT, id="SIGINT", marks=pytest.mark.skipif(
        os.name != "posix", reason="Ctrl-C on Windows is a console event (CTRL_C_EVENT) for a whole console group, "
        "which a test cannot send to bin/serve alone"))]


@pytest.mark.parametrize("stop_signal", STOP_SIGNALS)
def test_in_flight_stream_finishes_and_new_connections_are_refused(gateway, slow_upstream, stop_signal):
    serve = gateway("20")
    response, chunks = open_stream(serve)
    serve.process.send_signal(stop_signal)
    assert serve.wait_for_event("draining")["in_flight"] == 1
    with pytest.raises(requests.ConnectionError):
        requests.get(serve.url + "/health", timeout=5)
    assert serve.process.poll() is None  # still waiting for the stream
    slow_upstream[1].set()
    assert b"".join(chunks) == LAST  # the stream ended normally, nothing cut
    response.close()
    assert serve.process.wait(10) == 0
    serve.wait_for_event("stopped")


def test_new_request_on_an_open_keep_alive_connection_gets_503_while_draining(gateway, slow_upstream, httpserver):
    httpserver.expect_request("/v1/models").respond_with_json({"object": "list", "data": []})
    serve = gateway("20")
    kept = http.client.HTTPConnection("127.0.0.1", serve.port, timeout=10)
    kept.request("GET", "/v1/models")
    first = kept.getresponse()
    assert first.status == 200 and first.getheader("Connection") != "close"
    first.read()  # the connection stays open for the next request
    response, chunks = open_stream(serve)  # on another connection: keeps the drain going
    serve.process.send_signal(signal.SIGTERM)
    serve.wait_for_event("draining")
    # waitress accepts no new connection, but this one it accepted before: waitress keeps it open (no
    # Connection: close), and each request on it reaches the app, which refuses it in the OpenAI envelope.
    for _ in range(2):
        kept.request("GET", "/v1/models")
        refused = kept.getresponse()
        assert refused.status == 503 and refused.getheader("Retry-After") == "5"
        assert json.loads(refused.read())["error"]["code"] == "server_shutting_down"
    slow_upstream[1].set()
    assert b"".join(chunks) == LAST
    response.close()
    kept.close()
    assert serve.process.wait(10) == 0
    assert len(httpserver.log) == 2  # the first /v1/models and the stream: the refused ones never went upstream


def test_streams_past_the_grace_end_with_an_error_event(gateway):
    serve = gateway("0.5")
    response, chunks = open_stream(serve)
    stopped_at = time.monotonic()
    serve.process.send_signal(signal.SIGTERM)
    rest = b"".join(chunks)
    error = json.loads(rest.strip()[len(b"data: "):])["error"]
    assert error["code"] == "server_shutting_down"
    assert serve.process.wait(10) == 0
    assert time.monotonic() - stopped_at < 8
    assert serve.wait_for_event("grace period over; ending requests")["upstream_calls_cut"] == 1


def test_idle_gateway_stops_at_once(gateway):
    serve = gateway("30")
    started = time.monotonic()
    assert serve.stop() == 0
    assert time.monotonic() - started < 5


def test_requests_while_draining_get_503(fake_app, live_gateway):
    base = live_gateway(fake_app)  # through waitress, which refuses hop-by-hop headers from apps
    fake_app.extensions["lifecycle"].draining = True
    response = requests.get(base + "/v1/models", timeout=5)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "server_shutting_down"
    assert response.headers["Retry-After"] == "5"
