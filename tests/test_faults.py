"""Every upstream fault through the real waitress stack: the asserted answer, and (checked by the live_gateway
fixture) every waitress thread back to idle afterwards."""
import json
import socket
import threading

import anthropic
import openai
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


# (fault, its kind, the x-should-retry header its 502 carries, the retries the gateway made with UPSTREAM_RETRIES=2)
NEVER_SENT_OR_MAYBE_RUN = [(refused, "refused", None, 2), (dies_on_the_request, "reset", "false", 1)]


@pytest.mark.parametrize("fault, kind, should_retry, retries", NEVER_SENT_OR_MAYBE_RUN)
def test_a_request_llama_cpp_may_have_taken_is_counted_as_reset(make_app, httpserver, live_gateway, access_log,
                                                                fault, kind, should_retry, retries):
    # Judged by every try: the retry of a request llama.cpp died on is refused, but the request was sent.
    app = make_app(fault(httpserver, None)[0])
    response = requests.post(live_gateway(app) + CHAT, json=BODY, headers={"x-request-id": "dies"}, timeout=10)
    assert response.status_code == 502
    # The client's SDK must not send again what llama.cpp may have died of; one that never reached it, it may.
    assert response.headers.get("x-should-retry") == should_retry
    line = access_log.line("dies")  # its metrics are counted just before its line is written
    assert line["retries"] == retries  # the retries made: after "closed before any answer", one and no more
    assert value(scrape(app.test_client()), "gateway_upstream_errors_total", kind=kind) == 1


class CrashingPeer:
    """A llama.cpp that reads its first request and dies on it (its port closes, then the connection, with no
    answer), and is back on the same port, answering every request with answer, once restart() is called."""

    def __init__(self, answer: dict):
        self.answer = json.dumps(answer).encode()
        self.requests = 0  # requests read, before and after the restart
        first = socket.create_server(("127.0.0.1", 0))
        self.port = first.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.restarted = None
        threading.Thread(target=self._die, args=(first,), daemon=True).start()

    def _die(self, listener):
        conn, _ = listener.accept()
        with conn:
            read_request(conn)
            self.requests += 1
            listener.close()  # before the connection: the gateway's retry is refused

    def restart(self):
        """Listen on the same port again (a supervisor restarted it): what a resent request would reach."""
        if self.restarted is None:
            self.restarted = socket.create_server(("127.0.0.1", self.port))
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.restarted.accept()
            except OSError:
                return
            with conn:
                read_request(conn)
                self.requests += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (len(self.answer), self.answer))

    def close(self):
        """Stop listening."""
        if self.restarted is not None:
            self.restarted.close()


ANTHROPIC_ANSWER = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
                    "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 1}}


def openai_call(base, http_client):
    client = openai.OpenAI(base_url=base + "/v1", api_key="local", http_client=http_client)  # max_retries: 2
    return client.chat.completions.create(model="m", messages=BODY["messages"])


def anthropic_call(base, http_client):
    client = anthropic.Anthropic(base_url=base, api_key="local", http_client=http_client)  # max_retries: 2
    return client.messages.create(model="m", max_tokens=5, messages=BODY["messages"])


# (how each SDK calls, the SDK, what llama.cpp answers once back, the status of "could not reach" in its family)
SDK_CALLS = [(openai_call, openai, COMPLETION, 502), (anthropic_call, anthropic, ANTHROPIC_ANSWER, 529)]


@pytest.mark.parametrize("call, sdk, answer, status", SDK_CALLS, ids=["openai", "anthropic"])
def test_the_sdks_do_not_resend_a_request_llama_cpp_may_have_died_of(make_app, live_gateway,
                                                                     no_anthropic_environment, call, sdk, answer,
                                                                     status):
    # The SDKs resend a 5xx twice by default, after a backoff long enough for a supervisor to restart llama.cpp:
    # the prompt that crashed it would run again. Here llama.cpp is back by the time the client has its answer.
    peer = CrashingPeer(answer)
    seen = []

    def restart_on_the_answer(response):
        seen.append(response.status_code)
        peer.restart()

    base = live_gateway(make_app(peer.url))
    http_client = sdk.DefaultHttpxClient(event_hooks={"response": [restart_on_the_answer]})
    try:
        with pytest.raises(sdk.InternalServerError) as failed:
            call(base, http_client)
    finally:
        http_client.close()
        peer.close()
    assert failed.value.status_code == status and failed.value.response.headers["x-should-retry"] == "false"
    assert seen == [status]  # the SDK did not try again
    assert peer.requests == 1  # llama.cpp was given the request once


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
