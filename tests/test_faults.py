"""Every upstream fault through the real waitress stack: the asserted answer, and (checked by the live_gateway
fixture) every waitress thread back to idle afterwards."""
import json
import socket
import threading

import pytest
import requests
from werkzeug import Response

from tests.fakes import COMPLETION, LOADING, SSE_HEAD, BrokenPeer, chunk, read_request, unused_port_url
from tests.metrics_helpers import scrape, value

CHAT = "/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "hi"}]}
EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'


def refused(httpserver, release):
    return unused_port_url(), {}


def dies_on_the_request(httpserver, release):
    # A llama.cpp that reads the request and dies on it: its port closes, then the connection, with no answer;
    # the retries are refused.
    listener = socket.create_server(("127.0.0.1", 0))

    def die():
        conn, _ = listener.accept()
        with conn:
            read_request(conn)
            listener.close()  # here: closed from another thread, a blocked accept() would go on listening

    threading.Thread(target=die, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", {}


def hangs_before_headers(httpserver, release):
    httpserver.expect_request(CHAT).respond_with_handler(lambda request: release.wait(10) and Response("{}"))
    return None, {"CHAT_READ_TIMEOUT_S": "0.3"}


def loading_then_ready(httpserver, release):
    for _ in range(2):
        httpserver.expect_oneshot_request(CHAT).respond_with_json(LOADING, status=503)
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    return None, {}


def still_loading(httpserver, release):
    httpserver.expect_request(CHAT).respond_with_json(LOADING, status=503)
    return None, {}


def not_json(httpserver, release):
    httpserver.expect_request(CHAT).respond_with_data("<html>busy</html>", content_type="text/html")
    return None, {}


def truncated_json(httpserver, release):
    httpserver.expect_request(CHAT).respond_with_data('{"choices": [', content_type="application/json")
    return None, {}


def client_error(httpserver, release):
    httpserver.expect_request(CHAT).respond_with_json(
        {"error": {"code": 400, "message": "bad grammar", "type": "invalid_request_error"}}, status=400)
    return None, {}


@pytest.mark.parametrize("fault, status, code", [
    (refused, 502, "upstream_unavailable"),
    (dies_on_the_request, 502, "upstream_unavailable"),
    (hangs_before_headers, 504, "upstream_timeout"),
    (loading_then_ready, 200, None),
    (still_loading, 503, "upstream_unavailable"),
    (not_json, 502, "upstream_bad_response"),
    (truncated_json, 502, "upstream_bad_response"),
    (client_error, 400, None),
])
def test_non_streamed_faults(make_app, httpserver, live_gateway, fault, status, code):
    release = threading.Event()
    url, settings = fault(httpserver, release)
    base = live_gateway(make_app(url or httpserver.url_for("").rstrip("/"), **settings))
    try:
        response = requests.post(base + CHAT, json=BODY, timeout=10)
    finally:
        release.set()
    assert response.status_code == status
    if status != 200:
        error = response.json()["error"]
        assert error["code"] == code and error["message"]


@pytest.mark.parametrize("fault, kind", [(refused, "refused"), (dies_on_the_request, "reset")])
def test_a_request_llama_cpp_may_have_taken_is_counted_as_reset(make_app, httpserver, live_gateway, access_log,
                                                                fault, kind):
    # Judged by every try: the retry of a request llama.cpp died on is refused, but the request was sent.
    app = make_app(fault(httpserver, None)[0])
    response = requests.post(live_gateway(app) + CHAT, json=BODY, headers={"x-request-id": "dies"}, timeout=10)
    assert response.status_code == 502
    access_log.line("dies")  # its metrics are counted just before its line is written
    assert value(scrape(app.test_client()), "gateway_upstream_errors_total", kind=kind) == 1


def reset_mid_stream(peer, conn):
    conn.sendall(SSE_HEAD + chunk(EVENT))
    peer.reset(conn)


def silent_mid_stream(peer, conn):
    conn.sendall(SSE_HEAD + chunk(EVENT))
    peer.done.wait(10)


@pytest.mark.parametrize("script, code", [(reset_mid_stream, "upstream_bad_response"),
                                          (silent_mid_stream, "upstream_timeout")])
def test_streamed_faults_end_with_an_error_event(make_app, live_gateway, script, code):
    peer = BrokenPeer(script)
    try:
        base = live_gateway(make_app(peer.url, CHAT_READ_TIMEOUT_S="0.3"))
        response = requests.post(base + CHAT, json={**BODY, "stream": True}, timeout=10)
    finally:
        peer.close()
    assert response.status_code == 200
    events = [e for e in response.content.split(b"\n\n") if e]
    assert events[0] == EVENT.strip()
    assert json.loads(events[-1][len(b"data: "):])["error"]["code"] == code
