"""The waitress server: its own errors in the client's envelope, and stopping it from another thread, even when
waitress has already closed its trigger or a thread is blocked writing to a client that stopped reading; ambiguous
request framing refused."""
import json
import socket
import threading
import time

import pytest
import requests
from werkzeug import Response

from service.wsgi_server import make_server, stop_server
from tests.fakes import CHAT_ANSWER


def test_a_stop_that_finds_the_trigger_closed_still_ends_the_loop(make_app, httpserver):
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    app = make_app(httpserver.url_for("").rstrip("/"))
    server = make_server(app, host="127.0.0.1", port=0, threads=2, max_body_bytes=1024)
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    assert requests.get(f"http://127.0.0.1:{server.effective_port}/health", timeout=5).status_code == 200
    server.trigger.close()  # what a race inside waitress can leave behind (Pylons/waitress#468)
    stop_server(server)
    loop.join(5)
    assert not loop.is_alive()


def test_a_stop_frees_a_thread_blocked_writing_to_a_client_that_stopped_reading(make_app, httpserver, access_log):
    # waitress blocks a write past outbuf_high_watermark until the client takes bytes. At shutdown the thread
    # must be woken (the client marked gone), so that its request ends and is logged before the process exits.
    stop = threading.Event()
    event = b"data: " + json.dumps({"choices": [{"delta": {"content": "x" * 8000}}]}).encode() + b"\n\n"

    def endless(request):
        return Response((event for _ in range(100_000) if not stop.is_set()), content_type="text/event-stream")

    httpserver.expect_request("/v1/chat/completions").respond_with_handler(endless)
    # STREAM_STALL_TIMEOUT_S=0: the stall check never cuts it, only the stop can free its thread.
    app = make_app(httpserver.url_for("").rstrip("/"), STREAM_STALL_TIMEOUT_S="0")
    server = make_server(app, host="127.0.0.1", port=0, threads=2, max_body_bytes=4096,
                         outbuf_high_watermark=64 * 1024)
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    body = b'{"stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # takes little, then nothing more
    try:
        client.connect(("127.0.0.1", int(server.effective_port)))
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"x-request-id: blocked\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while not any(channel.total_outbufs_len > 64 * 1024 for channel in list(server.active_channels.values())):
            assert time.monotonic() < deadline, "the stream never filled waitress's buffer"
            time.sleep(0.01)
        stopping = time.monotonic()
        stop_server(server)  # its default timeout: a shorter one would hide a second wait for the blocked thread
        # One wait for the threads (what bin/serve's drain already gave them), then the socket closed at once: not
        # the ~10 s it took when the threads were stopped before the sockets were closed.
        assert time.monotonic() - stopping < 8
        # Once stop_server returns, the thread has ended and its request is logged: the process may exit now.
        assert not server.task_dispatcher.threads
        line = access_log.by_id["blocked"]
        assert line["status"] == 200 and line["path"] == "/v1/chat/completions"
        loop.join(5)
        assert not loop.is_alive()
    finally:
        stop.set()
        client.close()
        if loop.is_alive():
            stop_server(server)


def test_waitress_own_413_speaks_the_clients_family(make_app, httpserver, live_gateway):
    # waitress refuses a body over MAX_BODY_BYTES before Flask runs: the envelope still follows the route's family.
    base = live_gateway(make_app(httpserver.url_for("").rstrip("/"), MAX_BODY_BYTES="1000"))
    big = b'{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "' + b"x" * 2000 + b'"}]}'
    anthropic = requests.post(base + "/v1/messages", data=big, timeout=10,
                              headers={"Content-Type": "application/json", "anthropic-version": "2023-06-01"})
    assert anthropic.status_code == 413
    assert anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "request_too_large"
    assert "MAX_BODY_BYTES" in anthropic.json()["error"]["message"]
    assert anthropic.headers["request-id"] == anthropic.headers["x-request-id"]
    openai = requests.post(base + "/v1/chat/completions", data=big, timeout=10,
                           headers={"Content-Type": "application/json"})
    assert openai.status_code == 413 and set(openai.json()["error"]) == {"message", "type", "param", "code"}
    assert "request-id" not in openai.headers and openai.headers["x-request-id"]
    assert httpserver.log == []


def raw_exchange(base, request: bytes) -> tuple:
    """Send request bytes on a new connection; return (status line, headers, body) of the answer and what the
    connection gives after it (b"" once the server has closed it)."""
    host, port = base.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        head, body = answer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
        while len(body) < int(headers["content-length"]):
            body += sock.recv(65536)
        try:
            after = sock.recv(65536)
        except ConnectionResetError:
            after = b""
    return lines[0], headers, json.loads(body), after


CHAT_BODY = b'{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}'
CHUNKED_BODY = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT_BODY), CHAT_BODY)


@pytest.mark.parametrize("version, framing, body", [
    ("1.1", b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(CHUNKED_BODY), CHUNKED_BODY),
    ("1.1", b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", CHUNKED_BODY),
    ("1.1", b"Transfer-Encoding: gzip\r\n", b""),
    ("1.1", b"Transfer-Encoding: gzip, chunked\r\n", CHUNKED_BODY),
    ("1.1", b"Transfer-Encoding: chunked, chunked\r\n", CHUNKED_BODY),
    ("1.1", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", CHUNKED_BODY),
    ("1.0", b"Transfer-Encoding: chunked\r\n", CHUNKED_BODY),
], ids=["length-then-chunked", "chunked-then-length", "gzip", "gzip-chunked", "chunked-twice", "two-te-lines",
        "http-1.0-chunked"])
def test_ambiguous_framing_is_refused_and_the_connection_closed(make_app, httpserver, live_gateway, version,
                                                                  framing, body):
    # RFC 9112 section 6.3: a proxy in front could frame it the other way (request smuggling).
    base = live_gateway(make_app(httpserver.url_for("").rstrip("/")))
    request = (b"POST /v1/chat/completions HTTP/%s\r\nHost: gateway\r\nContent-Type: application/json\r\n%s\r\n%s"
               % (version.encode(), framing, body))
    status, headers, envelope, after = raw_exchange(base, request + b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
    assert status.split()[1] == "400"
    assert set(envelope["error"]) == {"message", "type", "param", "code"}
    assert "Transfer-Encoding" in envelope["error"]["message"]
    assert headers["connection"] == "close"
    assert after == b""  # closed: neither the body nor the request after it is read as a request
    assert httpserver.log == []


def test_ambiguous_framing_speaks_the_clients_family(make_app, httpserver, live_gateway):
    base = live_gateway(make_app(httpserver.url_for("").rstrip("/")))
    request = (b"POST /v1/messages HTTP/1.1\r\nHost: gateway\r\nanthropic-version: 2023-06-01\r\n"
               b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n%s" % (len(CHUNKED_BODY), CHUNKED_BODY))
    status, headers, envelope, after = raw_exchange(base, request)
    assert status.split()[1] == "400"
    assert envelope["type"] == "error" and envelope["error"]["type"] == "invalid_request_error"
    assert headers["request-id"] == headers["x-request-id"]
    assert after == b""


def test_plain_chunked_body_still_reaches_the_upstream(make_app, httpserver, live_gateway):
    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_json(CHAT_ANSWER)
    base = live_gateway(make_app(httpserver.url_for("").rstrip("/")))
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n%s" % CHUNKED_BODY)
    status, _, answer, _ = raw_exchange(base, request)
    assert status.split()[1] == "200"
    assert answer["object"] == "chat.completion"
    assert json.loads(httpserver.log[0][0].data)["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("trusted, forwarded, seen", [
    ("127.0.0.1", "10.1.2.3", "10.1.2.3"),  # the proxy says who the client is
    (None, "10.1.2.3", "127.0.0.1"),  # no proxy configured: a client's own header is not believed
    ("192.0.2.9", "10.1.2.3", "127.0.0.1"),  # not from the trusted proxy: not believed either
])
def test_a_trusted_proxy_names_the_client_and_nobody_else_does(trusted, forwarded, seen):
    from flask import Flask, request

    app = Flask(__name__)
    app.get("/who")(lambda: request.remote_addr)
    server = make_server(app, host="127.0.0.1", port=0, threads=2, max_body_bytes=1024, trusted_proxy=trusted)
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    try:
        answer = requests.get(f"http://127.0.0.1:{server.effective_port}/who",
                              headers={"X-Forwarded-For": forwarded}, timeout=5)
        assert answer.text == seen
    finally:
        stop_server(server)
        loop.join(5)
