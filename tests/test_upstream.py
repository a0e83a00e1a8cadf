"""Upstream calls: retries with backoff, per-route timeouts, and each failure mapped to its status."""
import json
import logging
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from urllib3.exceptions import NewConnectionError
from werkzeug import Response

from service.proxy.disconnect import UpstreamCall
from service.errors import ClientClosedRequest, UpstreamUnavailable
from service.proxy.upstream import Upstream, UpstreamRetry, make_retry
from tests.clients import assert_openai_envelope
from tests.fakes import COMPLETION, LOADING, BrokenPeer, read_request, unused_port_url

CHAT = "/v1/chat/completions"
CHAT_BODY = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}


def test_503_loading_is_retried_until_ready(fake_client, httpserver):
    for _ in range(2):
        httpserver.expect_oneshot_request(CHAT).respond_with_json(LOADING, status=503)
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    response = fake_client.post(CHAT, json=CHAT_BODY)
    assert response.status_code == 200
    assert response.get_json() == COMPLETION
    assert len(httpserver.log) == 3


@pytest.mark.parametrize("status", [502, 504])
def test_gateway_statuses_are_retried_then_502(fake_client, httpserver, status):
    httpserver.expect_request(CHAT).respond_with_data("bad gateway", status=status)
    error = assert_openai_envelope(fake_client.post(CHAT, json=CHAT_BODY), 502)
    assert f"HTTP {status}" in error["message"]
    assert len(httpserver.log) == 3  # the first try and UPSTREAM_RETRIES=2


def test_retry_count_is_a_setting(make_app, httpserver):
    client = make_app(httpserver.url_for("").rstrip("/"), UPSTREAM_RETRIES="0").test_client()
    httpserver.expect_request(CHAT).respond_with_json(LOADING, status=503)
    assert_openai_envelope(client.post(CHAT, json=CHAT_BODY), 503)
    assert len(httpserver.log) == 1


def test_still_loading_after_retries_is_503_with_retry_after(fake_client, httpserver):
    httpserver.expect_request(CHAT).respond_with_json(LOADING, status=503)
    response = fake_client.post(CHAT, json=CHAT_BODY)
    error = assert_openai_envelope(response, 503)
    assert "Loading model" in error["message"]
    assert response.headers["Retry-After"] == "1"
    assert len(httpserver.log) == 3


def test_upstream_retry_after_is_honoured(make_app, httpserver):
    client = make_app(httpserver.url_for("").rstrip("/"), UPSTREAM_BACKOFF_MAX_S="5").test_client()
    httpserver.expect_oneshot_request(CHAT).respond_with_json(LOADING, status=503, headers={"Retry-After": "1"})
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    started = time.monotonic()
    assert client.post(CHAT, json=CHAT_BODY).status_code == 200
    assert time.monotonic() - started >= 0.9  # the backoff alone would have waited 0.01 s


def test_a_huge_retry_after_is_capped_at_backoff_max(fake_client, httpserver):
    httpserver.expect_oneshot_request(CHAT).respond_with_json(LOADING, status=503, headers={"Retry-After": "3600"})
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    started = time.monotonic()
    assert fake_client.post(CHAT, json=CHAT_BODY).status_code == 200
    assert time.monotonic() - started < 5


def test_backoff_grows_exponentially():
    retry = make_retry(3, backoff=0.5, backoff_max=8)
    for _ in range(3):
        retry = retry.increment(method="POST", url="/", error=NewConnectionError(None, "refused"))
    assert retry.get_backoff_time() == 2.0  # 0.5 * 2 ** (3 - 1)


def test_connection_refused_is_502_after_retries(make_app):
    client = make_app(unused_port_url()).test_client()
    error = assert_openai_envelope(client.post(CHAT, json=CHAT_BODY), 502)
    assert "connection refused" in error["message"]
    assert error["code"] == "upstream_unavailable"


@pytest.mark.parametrize("status, kind", [(400, "invalid_request_error"), (404, "not_found_error"),
                                          (501, "not_supported_error")])
def test_upstream_client_errors_pass_through_unretried(fake_client, httpserver, status, kind):
    message = f"llama.cpp says no ({status})"
    httpserver.expect_request(CHAT).respond_with_json({"error": {"code": status, "message": message, "type": kind}},
                                                      status=status)
    error = assert_openai_envelope(fake_client.post(CHAT, json=CHAT_BODY), status)
    assert error["message"] == message
    assert error["type"] == kind
    assert len(httpserver.log) == 1


def test_context_overflow_gets_openai_code(fake_client, httpserver):
    httpserver.expect_request(CHAT).respond_with_json(
        {"error": {"code": 400, "message": "request exceeds the available context size",
                   "type": "exceed_context_size_error", "n_prompt_tokens": 5000, "n_ctx": 4096}}, status=400)
    error = assert_openai_envelope(fake_client.post(CHAT, json=CHAT_BODY), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["type"] == "invalid_request_error"


def test_a_non_json_error_body_is_described_not_quoted(fake_client, httpserver):
    httpserver.expect_request(CHAT).respond_with_data("echo: my secret prompt", status=500, content_type="text/plain")
    error = assert_openai_envelope(fake_client.post(CHAT, json=CHAT_BODY), 502)
    assert "secret" not in error["message"]
    assert "HTTP 500" in error["message"] and "text/plain" in error["message"]


def test_upstream_500_is_502_naming_it(fake_client, httpserver):
    httpserver.expect_request(CHAT).respond_with_json({"error": {"code": 500, "message": "boom",
                                                                 "type": "server_error"}}, status=500)
    error = assert_openai_envelope(fake_client.post(CHAT, json=CHAT_BODY), 502)
    assert "HTTP 500 (server_error)" in error["message"] and error["message"].endswith(": boom")
    assert len(httpserver.log) == 1  # 500 is not a transient status


SECRET = "my-secret-prompt-text"
# What this llama.cpp build answers to an assistant message whose tool call has no name (common/chat.cpp,
# common_chat_msgs_parse_oaicompat): the tool call, arguments and all, in a 500's message.
TOOL_CALL = {"type": "function", "function": {"arguments": SECRET}}
QUOTING_500 = {"error": {"code": 500, "type": "server_error",
                         "message": "Failed to parse messages: Missing tool call name: " + json.dumps(TOOL_CALL)}}
BAD_TOOL_CALL = {"messages": [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}]}


def logged_text(caplog) -> str:
    """Every line the gateway logged, message and structured fields; not llama.cpp's own output, which only
    LOG_LEVEL=DEBUG relays (and where llama.cpp logs such an error message itself)."""
    return "\n".join(f"{record.getMessage()} {getattr(record, 'fields', '')}" for record in caplog.records
                     if record.getMessage() != "llama.cpp output")


def test_a_500_quoting_the_request_tells_the_client_but_not_the_logs(fake_client, httpserver, caplog):
    caplog.set_level(logging.DEBUG)
    httpserver.expect_request(CHAT).respond_with_json(QUOTING_500, status=500)
    # Any body: the fake quotes the tool call whatever it is sent (the gateway's own schema refuses this one).
    error = assert_openai_envelope(fake_client.post(CHAT, json=CHAT_BODY), 502)
    assert SECRET not in logged_text(caplog)
    assert SECRET in error["message"]  # llama.cpp's words are the client's own to read
    assert "HTTP 500 (server_error)" in logged_text(caplog)  # the operator still learns what failed


@pytest.mark.llama
def test_llama_errors_quoting_the_request_stay_out_of_the_logs(llama_client, caplog):
    caplog.set_level(logging.DEBUG)
    response = llama_client.post(CHAT, json={**BAD_TOOL_CALL, "max_tokens": 1})
    assert response.status_code >= 400  # llama.cpp refuses it, quoting the tool call (a 500 in this build)
    assert SECRET not in logged_text(caplog)


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"choices": [', b"[1, 2]", b""])
def test_unparseable_answer_is_502(fake_client, httpserver, body):
    httpserver.expect_request(CHAT).respond_with_data(body, content_type="application/json")
    error = assert_openai_envelope(fake_client.post(CHAT, json=CHAT_BODY), 502)
    assert "not a JSON object" in error["message"]


def _slow_handler(release, delay_s):
    def handle(request):
        release.wait(delay_s)
        return Response(json.dumps(COMPLETION), content_type="application/json")
    return handle


def test_read_timeouts_are_per_route(make_app, httpserver):
    release_chat = threading.Event()
    client = make_app(httpserver.url_for("").rstrip("/"), CHAT_READ_TIMEOUT_S="0.2",
                      EMBEDDINGS_READ_TIMEOUT_S="10").test_client()
    httpserver.expect_request(CHAT).respond_with_handler(_slow_handler(release_chat, 5))
    httpserver.expect_request("/v1/embeddings").respond_with_handler(_slow_handler(threading.Event(), 0.4))
    try:
        with client.post(CHAT, json=CHAT_BODY) as timed_out:  # closed, as a server does: its slot is free again
            error = assert_openai_envelope(timed_out, 504)
        assert "within 0.2 s" in error["message"]
        assert error["code"] == "upstream_timeout"
    finally:
        release_chat.set()
    # The same silence is fine on a route with a longer read timeout.
    assert client.post("/v1/embeddings", json={"input": "hi"}).status_code == 200
    assert [entry[0].path for entry in httpserver.log] == [CHAT, "/v1/embeddings"]  # the timeout was not retried


def test_llama_api_key_is_sent_upstream_and_client_headers_are_not(make_app, httpserver):
    client = make_app(httpserver.url_for("").rstrip("/"), LLAMA_API_KEY="upstream-secret").test_client()
    httpserver.expect_request(CHAT, headers={"Authorization": "Bearer upstream-secret"}).respond_with_json(COMPLETION)
    response = client.post(CHAT, json=CHAT_BODY, headers={"Authorization": "Bearer client-key", "Cookie": "a=b"})
    assert response.status_code == 200
    assert "Cookie" not in httpserver.log[0][0].headers


def test_connection_closed_before_any_answer_is_retried(make_app):
    # What a kept-alive connection the server has just dropped looks like: closed without a byte of answer.
    def script(peer, conn):
        if peer.requests == 1:
            return
        body = json.dumps(COMPLETION).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))

    peer = BrokenPeer(script)
    try:
        response = make_app(peer.url).test_client().post(CHAT, json=CHAT_BODY)
    finally:
        peer.close()
    assert response.status_code == 200
    assert peer.requests == 2


def test_streams_do_not_reuse_connections(fake_client, httpserver):
    httpserver.expect_request(CHAT, headers={"Connection": "close"}).respond_with_data(
        "data: [DONE]\n\n", content_type="text/event-stream")
    response = fake_client.post(CHAT, json={**CHAT_BODY, "stream": True})
    assert response.get_data() == b"data: [DONE]\n\n"


def test_session_pool_is_sized_to_threads():
    upstream = Upstream({"http://127.0.0.1:9": 2}, timeouts={"chat": (1, 1)}, pool_size=12)
    adapter = upstream.session.get_adapter("http://127.0.0.1:9/v1/chat/completions")
    assert adapter._pool_maxsize == 12
    assert upstream.session.get_adapter("http://127.0.0.1:9/health").max_retries.total == 0
    upstream.close()


def _answer(status=200, body=COMPLETION) -> bytes:
    data = json.dumps(body).encode()
    return (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(data), data))


class KeptAlivePeer(BrokenPeer):
    """A raw-socket llama-server that answers every request on a connection and keeps it open; answers[n]
    (a status) answers the n-th request, 200 once they run out (None: the connection is closed without an
    answer). served counts requests, requests connections."""

    def __init__(self, answers=(), before_answer=None):
        self.served = 0
        self.answers, self.before_answer = list(answers), before_answer
        super().__init__(self._serve_connection)

    def _serve_connection(self, peer, conn):
        while True:
            self.served += 1
            if self.before_answer:
                self.before_answer(self.served)
            status = self.answers[self.served - 1] if self.served <= len(self.answers) else 200
            if status is None:
                return
            conn.sendall(_answer(status, LOADING if status == 503 else COMPLETION))
            if not read_request(conn):
                return


def _post(upstream, call=None, record=None):
    return upstream.request("POST", CHAT, group="chat", body=b"{}", call=call, record=record)


@pytest.mark.parametrize("retries", [0, 2])
def test_a_kept_alive_connection_closed_unanswered_is_retried_once_whatever_the_budget(retries):
    # llama.cpp drops an idle kept-alive connection just as a request is sent on it: a harmless race. A replica
    # that others back up has no retries (routing.upstream_targets), and such a close does not fail over (it may
    # have been read): it gets its one retry all the same, on a new connection.
    peer = KeptAlivePeer(answers=[200, None])
    upstream = Upstream({peer.url: retries}, timeouts={"chat": (5, 5)}, backoff=0.01)
    record = SimpleNamespace()
    try:
        assert _post(upstream).json() == COMPLETION  # its connection goes back to the pool
        assert _post(upstream, record=record).json() == COMPLETION
    finally:
        peer.close()
        upstream.close()
    assert (peer.served, peer.requests) == (3, 2)  # the closed one sent again once, on a new connection
    assert record.retries == 1


def test_a_late_cut_never_shuts_a_connection_back_in_the_pool():
    # The watcher may cut a call after its answer was read and its connection went back to the pool, where
    # another client's request may already be using it. That request must see its own answer, sent once.
    second_arrived, answer_second = threading.Event(), threading.Event()

    def before_answer(n):
        if n == 2:
            second_arrived.set()
            answer_second.wait(5)

    peer = KeptAlivePeer(before_answer=before_answer)
    upstream = Upstream({peer.url: 2}, timeouts={"chat": (5, 5)})
    outcome = []
    other = threading.Thread(target=lambda: outcome.append(_post(upstream).json()))
    try:
        call = UpstreamCall()
        assert _post(upstream, call).json() == COMPLETION  # read to its end: the connection is back in the pool
        other.start()
        assert second_arrived.wait(5)  # another request is on that connection now
        call.abort()  # the first call's client is seen gone only now
        answer_second.set()
        other.join(5)
    finally:
        answer_second.set()
        peer.close()
        upstream.close()
    assert outcome == [COMPLETION]
    assert (peer.served, peer.requests) == (2, 1)  # not broken and retried on a new connection: sent once


def test_a_call_cut_during_a_retry_backoff_sends_nothing_more(monkeypatch):
    call = UpstreamCall()
    backoff = UpstreamRetry.sleep

    def client_leaves_during_backoff(retry, response=None):
        call.abort()  # the 503's connection is back in the pool now, waiting for the retry
        backoff(retry, response)

    monkeypatch.setattr(UpstreamRetry, "sleep", client_leaves_during_backoff)
    peer = KeptAlivePeer(answers=[503])
    upstream = Upstream({peer.url: 2}, timeouts={"chat": (5, 5)}, backoff=0.01)
    try:
        with pytest.raises(ClientClosedRequest):
            _post(upstream, call)
        assert peer.served == 1  # the retry was never sent
        monkeypatch.undo()
        assert _post(upstream).json() == COMPLETION
    finally:
        peer.close()
        upstream.close()
    assert (peer.served, peer.requests) == (2, 1)  # the pooled connection outlived the cut call


def _dies_on_its_first_request() -> str:
    """The URL of a llama.cpp that reads one request and dies on it: its port closes, then the connection,
    with no byte of answer. Later connections are refused."""
    listener = socket.create_server(("127.0.0.1", 0))

    def die():
        conn, _ = listener.accept()
        with conn:
            read_request(conn)
            listener.close()  # here, not from another thread: a close there would leave a blocked accept() listening

    threading.Thread(target=die, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_a_request_llama_cpp_read_before_it_died_is_reset_though_the_retries_were_refused():
    upstream = Upstream({_dies_on_its_first_request(): 2}, timeouts={"chat": (5, 5)}, backoff=0.01)
    try:
        with pytest.raises(UpstreamUnavailable) as failed:
            _post(upstream)
    finally:
        upstream.close()
    # The retry (a stale kept-alive connection looks the same) found the port closed ...
    assert "closed before any answer" in failed.value.message and "connection refused" in failed.value.message
    # ... but the verdict is by every try, not the last: llama.cpp had the request, so it is never sent again
    # after a restart.
    assert failed.value.kind == "reset"


def test_after_a_try_llama_cpp_may_have_taken_there_is_one_retry_and_no_more():
    # Closed before any answer, then a llama.cpp that is loading again (restarted after dying on this request?):
    # another retry could reach it once loaded and run the request a second time, so its 503 is the answer.
    def script(peer, conn):
        if peer.requests > 1:
            conn.sendall(_answer(503, LOADING))

    peer = BrokenPeer(script)
    upstream = Upstream({peer.url: 3}, timeouts={"chat": (5, 5)}, backoff=0.01)
    try:
        with pytest.raises(UpstreamUnavailable) as failed:
            _post(upstream)
    finally:
        peer.close()
        upstream.close()
    assert (failed.value.status, failed.value.kind) == (503, "loading")
    assert peer.requests == 2  # UPSTREAM_RETRIES=3 would have made it 4


@pytest.mark.parametrize("url, budget, made", [
    (_dies_on_its_first_request, 3, 1),  # closed before any answer, then refused: one retry and no more
    (unused_port_url, 2, 2),  # refused every time: the whole budget
    (unused_port_url, 0, 0),  # a replica another backs up: moves on at once (the one retry is a close's alone)
], ids=["closed-then-refused", "refused", "refused-no-budget"])
def test_the_retries_logged_are_those_made_not_the_budget(url, budget, made):
    upstream = Upstream({url(): budget}, timeouts={"chat": (5, 5)}, backoff=0.01)
    record = SimpleNamespace()
    try:
        with pytest.raises(UpstreamUnavailable):
            _post(upstream, record=record)
    finally:
        upstream.close()
    assert record.retries == made
