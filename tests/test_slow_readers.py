"""A stream whose client stops reading is cut after STREAM_STALL_TIMEOUT_S (llama.cpp's slot freed, the log line
says client_stalled); a client that reads, however long the stream, is not."""
import contextlib
import http.client
import json
import select
import socket
import threading
import time

import pytest

from service.wsgi_server import make_server, stop_server
from tests.fakes import SSE_HEAD, BrokenPeer, chunk
from tests.processes import LONG, llama_metric, wait_processing

CHAT = "/v1/chat/completions"
BODY = json.dumps({"stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
# A big event, so that the buffers between the gateway and a client that reads nothing fill in a few writes.
BIG_EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"a" * 16384 + b'"}}]}\n\n'
WATERMARK = 64 * 1024


@contextlib.contextmanager
def serving(app, watermark=WATERMARK, send_buffer=None):
    """The gateway under waitress, with a small outbuf_high_watermark (and, if given, the kernel's send buffer of
    its connections); yield (host, port, server)."""
    server = make_server(app, host="127.0.0.1", port=0, threads=4, max_body_bytes=app.config["MAX_BODY_BYTES"],
                         outbuf_high_watermark=watermark)
    if send_buffer:
        # Accepted sockets take it from the listening one. On loopback (64 KiB segments) the kernel would
        # otherwise grow it to megabytes, which a slow generation takes minutes to fill.
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    thread = threading.Thread(target=server.run, name="waitress-slow-readers", daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", int(server.effective_port), server
        deadline = time.monotonic() + 5
        while server.task_dispatcher.active_count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.task_dispatcher.active_count == 0, "a waitress thread is still busy"
    finally:
        stop_server(server)
        thread.join(5)


def send_closed(conn) -> bool:
    """Whether the gateway closed its end of conn (readable, and nothing to read)."""
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def flood(events: int = None):
    """A llama.cpp that streams BIG_EVENT without end (or events of them), watching, as llama.cpp does, for the
    gateway closing the connection; it sets peer.closed_by_client when it sees that."""
    def script(peer, conn):
        conn.sendall(SSE_HEAD)
        sent_events = 0
        while events is None or sent_events < events:
            pending = memoryview(chunk(BIG_EVENT))
            while pending:
                readable, writable, _ = select.select([conn], [conn], [], 0.05)
                if peer.done.is_set() or (readable and send_closed(conn)):
                    peer.closed_by_client.set()
                    return
                if writable:
                    pending = pending[conn.send(pending):]
            sent_events += 1
        conn.sendall(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return script


def buffered_bytes(server) -> int:
    """The bytes waitress holds for its connections, not yet taken by their clients."""
    return sum(getattr(channel, "total_outbufs_len", 0) for channel in list(server._map.values()))


def request_head(path=CHAT, body=BODY) -> bytes:
    """A streamed request, as raw HTTP."""
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), len(body), body))


def never_reading(host, port, raw: bytes) -> socket.socket:
    """A client that sends raw and then reads nothing, with a small receive window."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: it sets the window
    client.connect((host, port))
    client.sendall(raw)
    return client


def test_a_client_that_stops_reading_is_cut_and_its_thread_freed(make_app, access_log):
    peer = BrokenPeer(flood())
    try:
        app = make_app(peer.url, STREAM_STALL_TIMEOUT_S="1")
        with serving(app) as (host, port, server), never_reading(host, port, request_head()) as client:
            started = time.monotonic()
            assert peer.closed_by_client.wait(6), "llama.cpp's connection stayed open for a client that reads nothing"
            assert time.monotonic() - started < 6
            # What a client that reads nothing costs: the watermark, and the one write that went past it.
            assert buffered_bytes(server) <= WATERMARK + len(BIG_EVENT)
            # Its connection is closed and its waitress thread freed, while the client still holds its socket.
            [line] = access_log.wait(1)
            deadline = time.monotonic() + 2
            while server.task_dispatcher.active_count and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.task_dispatcher.active_count == 0, "the stalled stream still holds a waitress thread"
            assert client.fileno() != -1
    finally:
        peer.close()
    assert line["error"] == "client_stalled"
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert "gateway_stalled_streams_total 1.0" in metrics


def read_stream(make_app, access_log, answer) -> tuple:
    """Stream a chat answer from a raw-socket upstream (answer(peer, conn)) through a gateway with a 1 s stall
    timeout, reading all of it at once; return (the body, the request's log line)."""
    peer = BrokenPeer(answer)
    try:
        with serving(make_app(peer.url, STREAM_STALL_TIMEOUT_S="1")) as (host, port, _):
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("POST", CHAT, body=BODY, headers={"Content-Type": "application/json"})
            body = conn.getresponse().read()
            conn.close()
            [line] = access_log.wait(1)
    finally:
        peer.close()
    return body, line


@pytest.mark.parametrize("events", [400])  # 6.4 MiB: a hundred times the watermark
def test_a_client_that_reads_is_not_cut(make_app, access_log, events):
    body, line = read_stream(make_app, access_log, flood(events))
    assert body.count(b"data: {") == events and body.endswith(b"data: [DONE]\n\n")
    assert "error" not in line


def test_a_stream_waiting_on_llama_is_not_a_stalled_client(make_app, access_log):
    def slow(peer, conn):
        conn.sendall(SSE_HEAD + chunk(BIG_EVENT))
        peer.done.wait(1.5)  # llama.cpp silent past STREAM_STALL_TIMEOUT_S (a long prompt, say)
        conn.sendall(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    body, line = read_stream(make_app, access_log, slow)
    assert body == BIG_EVENT + b"data: [DONE]\n\n"
    assert "error" not in line


@pytest.mark.llama
def test_llama_frees_the_slot_of_a_client_that_stops_reading(slow_llama, make_app, access_log):
    predicted_before = llama_metric(slow_llama, "llamacpp:tokens_predicted_total")
    app = make_app(slow_llama.url, STREAM_STALL_TIMEOUT_S="1")
    body = json.dumps({**LONG, "stream": True}).encode()
    with serving(app, watermark=4096, send_buffer=4096) as (host, port, _), \
            never_reading(host, port, request_head("/v1/completions", body)) as client:
        wait_processing(slow_llama, 1, timeout=10)
        # The buffers fill, the write blocks for 1 s, the call is cut; llama.cpp notices within about a second.
        wait_processing(slow_llama, 0, timeout=30)
        predicted = llama_metric(slow_llama, "llamacpp:tokens_predicted_total") - predicted_before
        client.close()
        [line] = access_log.wait(1)
    assert predicted < LONG["max_tokens"], f"llama.cpp generated all {predicted:g} tokens for a stalled client"
    assert line["error"] == "client_stalled"
