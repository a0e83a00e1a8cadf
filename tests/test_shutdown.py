"""Graceful shutdown of bin/serve: no new connections, in-flight streams finish within the grace, the rest end
with an error event, requests still waiting for a slot with a 503 (nothing more sent upstream), each request
logged, exit code 0."""
import http.client
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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
    # The first /v1/models and the stream (beside the start's /health probe): the refused ones never went upstream.
    assert [request.path for request, _ in httpserver.log if request.path != "/health"] == ["/v1/models", CHAT]


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


STREAM_M = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def queue_depth(serve) -> float:
    """The gateway's gateway_queue_depth for the model m, from its /metrics."""
    for line in requests.get(serve.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith('gateway_queue_depth{model="m"}'):
            return float(line.split()[1])
    return 0.0


def queued_stream_body(serve):
    """A stream that waits for a slot: the SSE comments it is sent meanwhile, then how it ends."""
    with requests.post(serve.url + CHAT, stream=True, timeout=30, headers={"x-request-id": "queued-stream"},
                       json=STREAM_M) as response:
        assert response.status_code == 200
        return response.content


def test_requests_waiting_for_a_slot_get_503_when_the_grace_is_over(slow_upstream, httpserver):
    # One slot: a stream holds it past the grace; a stream, a chat and an Anthropic message wait for it.
    serve = ServeProcess(MODEL_UPSTREAMS=f"m={slow_upstream[0]}", MODEL_SETTINGS="m:slots=1", SHUTDOWN_GRACE_S="1")
    try:
        serve.wait_for_event("ready")
        holder = requests.post(serve.url + CHAT, stream=True, timeout=30, headers={"x-request-id": "holder"},
                               json=STREAM_M)
        chunks = holder.iter_content(None)
        assert next(chunks) == FIRST
        with ThreadPoolExecutor(3) as waiting:
            stream = waiting.submit(queued_stream_body, serve)
            chat = waiting.submit(requests.post, serve.url + CHAT, timeout=30, json={**STREAM_M, "stream": False},
                                  headers={"x-request-id": "queued-chat"})
            message = waiting.submit(requests.post, serve.url + "/v1/messages", timeout=30, json={
                "model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
                headers={"x-request-id": "queued-message", "anthropic-version": "2023-06-01"})
            deadline = time.monotonic() + 10
            while queue_depth(serve) < 3:
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.05)
            serve.process.send_signal(signal.SIGTERM)
            # The holder is cut at the end of the grace, as before.
            assert json.loads(b"".join(chunks).strip()[len(b"data: "):])["error"]["code"] == "server_shutting_down"
            holder.close()
            # The waiting stream answered 200 at once (its SSE comments keep clients waiting): it ends with the
            # family's error event.
            events = [event for event in stream.result().split(b"\n\n") if event.startswith(b"data: ")]
            assert [json.loads(event[len(b"data: "):])["error"]["code"] for event in events] == [
                "server_shutting_down"]
            refused = chat.result()
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
            assert refused.json()["error"]["code"] == "server_shutting_down"
            overloaded = message.result()  # Anthropic's envelope, and its status for "overloaded"
            assert overloaded.status_code == 529 and overloaded.json()["type"] == "error"
            assert overloaded.json()["error"]["type"] == "overloaded_error"
        assert serve.process.wait(15) == 0
        lines = [json.loads(line) for line in serve.output().splitlines()]
    finally:
        serve.stop(signal.SIGKILL)
    # The slot freed by the cut went to nobody: the holder's is the only generation llama.cpp ever received.
    assert [request.path for request, _ in httpserver.log].count(CHAT) == 1
    assert [request.path for request, _ in httpserver.log].count("/v1/messages") == 0
    logged = {line["request_id"]: line for line in lines if line["event"] == "request"}
    assert {name: (logged[name]["status"], logged[name]["error"]) for name in (
        "holder", "queued-stream", "queued-chat", "queued-message")} == {
        "holder": (200, "server_shutting_down"), "queued-stream": (200, "server_shutting_down"),
        "queued-chat": (503, "server_shutting_down"), "queued-message": (529, "server_shutting_down")}
