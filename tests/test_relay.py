"""SSE relay through the real waitress stack: unbuffered, byte-faithful, and mid-stream failures as error events."""
import http.client
import json
import threading
import time
from urllib.parse import urlsplit

from werkzeug import Response

from tests.fakes import SSE_HEAD, BrokenPeer, chunk

CHAT = "/v1/chat/completions"
STREAM_BODY = json.dumps({"model": "llama", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
STREAM_WITH_USAGE = json.dumps({**json.loads(STREAM_BODY), "stream_options": {"include_usage": True}})

EVENT_1 = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"}}]}\n\n'
EVENT_2 = b'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
DONE = b"data: [DONE]\n\n"


def open_stream(base_url, body=STREAM_BODY):
    """POST a streaming request with http.client, so that the test reads the bytes exactly as sent."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("POST", CHAT, body=body, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def read_until(response, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        more = response.read1(65536)
        assert more, f"stream ended before {marker!r}; got {data!r}"
        data += more
    return data


def read_all(response) -> bytes:
    data = b""
    while more := response.read1(65536):
        data += more
    return data


def sse_upstream(httpserver, *pieces, gate=None):
    """The fake upstream streams pieces; with a gate, it waits on it before each piece after the first."""
    def stream():
        for index, piece in enumerate(pieces):
            if gate is not None and index:
                assert gate.wait(5), "the gateway held the first event back"
            yield piece

    httpserver.expect_request(CHAT).respond_with_handler(
        lambda request: Response(stream(), content_type="text/event-stream", headers={"X-Accel-Buffering": "no"}))


def test_each_event_reaches_the_client_before_the_next_is_produced(fake_app, httpserver, live_gateway):
    first_seen = threading.Event()
    sse_upstream(httpserver, EVENT_1, EVENT_2, DONE, gate=first_seen)
    conn, response = open_stream(live_gateway(fake_app))
    # The upstream will not produce EVENT_2 until this read has returned EVENT_1 through the gateway.
    assert read_until(response, b"\n\n") == EVENT_1
    first_seen.set()
    assert read_all(response) == EVENT_2 + DONE
    conn.close()


def test_stream_is_byte_faithful_with_pings_and_usage(fake_app, httpserver, live_gateway):
    body = b": ping\n\n" + EVENT_1 + b": keep-alive comment\n\n" + EVENT_2 + USAGE + DONE
    sse_upstream(httpserver, body[:7], body[7:50], body[50:])
    conn, response = open_stream(live_gateway(fake_app), STREAM_WITH_USAGE)
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    assert response.getheader("Cache-Control") == "no-cache"
    assert response.getheader("X-Accel-Buffering") == "no"
    assert read_all(response) == body
    conn.close()


def test_usage_chunk_asked_for_by_the_gateway_is_taken_out(fake_app, httpserver, live_gateway):
    # The client did not ask for usage: the gateway asks llama.cpp for it (to count tokens) and strips it.
    sse_upstream(httpserver, EVENT_1, EVENT_2 + USAGE, DONE)
    conn, response = open_stream(live_gateway(fake_app))
    assert read_all(response) == EVENT_1 + EVENT_2 + DONE
    conn.close()
    sent = json.loads(httpserver.log[0][0].get_data())
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == json.loads(STREAM_BODY)["messages"]


def test_text_completion_streams_are_not_rewritten(fake_app, httpserver, live_gateway):
    raw = b'{"prompt": "hi", "stream": true}'
    httpserver.expect_request("/v1/completions", data=raw).respond_with_data(
        EVENT_1 + USAGE + DONE, content_type="text/event-stream")
    response = fake_app.test_client().post("/v1/completions", data=raw, content_type="application/json")
    assert response.get_data() == EVENT_1 + USAGE + DONE


def test_error_before_the_first_byte_is_a_normal_http_error(fake_app, httpserver, live_gateway):
    httpserver.expect_request(CHAT).respond_with_json(
        {"error": {"code": 400, "message": "prompt too long", "type": "exceed_context_size_error"}}, status=400)
    conn, response = open_stream(live_gateway(fake_app))
    assert response.status == 400
    assert response.getheader("Content-Type") == "application/json"
    assert json.loads(read_all(response))["error"]["code"] == "context_length_exceeded"
    conn.close()


def error_event(data: bytes) -> dict:
    last = data.strip().split(b"\n\n")[-1]
    assert last.startswith(b"data: "), data
    return json.loads(last[len(b"data: "):])["error"]


def test_reset_mid_stream_ends_with_an_error_event(make_app, live_gateway):
    def script(peer, conn):
        conn.sendall(SSE_HEAD + chunk(EVENT_1) + chunk(b'data: {"choices":[{"ind'))
        peer.reset(conn)

    peer = BrokenPeer(script)
    try:
        conn, response = open_stream(live_gateway(make_app(peer.url)))
        data = read_all(response)
        conn.close()
    finally:
        peer.close()
    assert data.startswith(EVENT_1)
    assert data.count(b"data: ") == 2  # the half event is dropped, so the error event stands on its own
    error = error_event(data)
    assert error["code"] == "upstream_bad_response"
    assert "broke off the stream" in error["message"]
    assert peer.requests == 1  # never retried once the stream had started


def test_silence_mid_stream_ends_with_a_timeout_event(make_app, live_gateway):
    def script(peer, conn):
        conn.sendall(SSE_HEAD + chunk(EVENT_1))
        peer.done.wait(10)

    peer = BrokenPeer(script)
    try:
        conn, response = open_stream(live_gateway(make_app(peer.url, CHAT_READ_TIMEOUT_S="0.3")))
        data = read_all(response)
        conn.close()
    finally:
        peer.close()
    assert data.startswith(EVENT_1)
    error = error_event(data)
    assert error["code"] == "upstream_timeout"
    assert "0.3 s" in error["message"]


def test_client_going_away_closes_the_upstream_connection(make_app, live_gateway):
    def script(peer, conn):
        conn.sendall(SSE_HEAD + chunk(EVENT_1))
        # Keep streaming until the gateway hangs up on us.
        while not peer.done.is_set():
            conn.sendall(chunk(b": ping\n\n"))
            time.sleep(0.05)

    peer = BrokenPeer(script)
    try:
        conn, response = open_stream(live_gateway(make_app(peer.url)))
        assert read_until(response, b"\n\n").startswith(EVENT_1)
        response.close()
        conn.close()
        assert peer.closed_by_client.wait(5), "the gateway kept the upstream stream open after the client left"
    finally:
        peer.close()


def test_more_streams_than_threads_wait_their_turn(make_app, live_gateway):
    release = threading.Event()

    def script(peer, conn):
        conn.sendall(SSE_HEAD + chunk(EVENT_1))
        release.wait(10)
        conn.sendall(chunk(EVENT_2 + DONE) + chunk(b""))

    peer = BrokenPeer(script)
    base = live_gateway(make_app(peer.url), threads=2)
    results, first_bytes = {}, {}

    def client(name):
        conn, response = open_stream(base)
        first_bytes[name] = (time.monotonic(), read_until(response, b"\n\n"))
        results[name] = read_all(response)
        conn.close()

    try:
        clients = [threading.Thread(target=client, args=(n,)) for n in range(3)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 5
        while len(first_bytes) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert len(first_bytes) == 2  # two threads, two streams; the third waits in waitress's queue
        released_at = time.monotonic()
        release.set()
        for thread in clients:
            thread.join(10)
    finally:
        peer.close()
    assert sorted(results) == [0, 1, 2]  # nobody hung, nobody was dropped
    assert all(first + rest == EVENT_1 + EVENT_2 + DONE for (_, first), rest in
               zip((first_bytes[n] for n in range(3)), (results[n] for n in range(3))))
    assert max(stamp for stamp, _ in first_bytes.values()) >= released_at  # the third started after a thread freed
