"""A client that goes away gets its llama-server call closed within a second, even while llama.cpp is silent."""
import http.client
import json
import logging
import socket
import time
from urllib.parse import urlsplit

import pytest

from service.errors import CancelledByOperator, ShuttingDown
from service.operations.request_log import RequestRecord
from service.proxy.disconnect import (CANCELLED, CLIENT_LEFT, CLIENT_STALLED, SHUTDOWN, DisconnectWatch, StallClock,
                                     UpstreamCall)
from service.proxy.upstream import Upstream
from tests.fakes import SSE_HEAD, BrokenPeer, Clock, chunk
from tests.processes import LONG, llama_metric, wait_processing

CHAT = "/v1/chat/completions"
EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'


def wait_for_close(peer, conn):
    """Script: block until the gateway closes the upstream connection (recv returns nothing)."""
    conn.settimeout(10)
    try:
        if conn.recv(1) == b"":
            peer.closed_by_client.set()
    except OSError:
        peer.closed_by_client.set()


def test_watch_cuts_only_calls_whose_client_left():
    watch = DisconnectWatch(interval_s=0.01)
    gone, staying = UpstreamCall(), UpstreamCall()
    watch.watch(gone, lambda: True)
    watch.watch(staying, lambda: False)
    deadline = time.monotonic() + 2
    while not gone.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gone.aborted and not staying.aborted
    watch.unwatch(staying)


def test_watch_cuts_calls_whose_client_stalled_and_says_why():
    watch = DisconnectWatch(interval_s=0.01)
    stalled, left, reading = UpstreamCall(), UpstreamCall(), UpstreamCall()
    watch.watch(stalled, lambda: False, lambda: True)
    watch.watch(left, lambda: True, lambda: True)  # gone is gone, whether or not it read
    watch.watch(reading, lambda: False, lambda: False)
    deadline = time.monotonic() + 2
    while not (stalled.aborted and left.aborted) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (stalled.aborted, left.aborted, reading.aborted) == (CLIENT_STALLED, CLIENT_LEFT, None)
    watch.unwatch(reading)


def test_after_abort_all_a_new_call_is_cut_before_it_is_sent():
    # The shutdown grace is over: a request that got a slot just then must send nothing upstream.
    watch = DisconnectWatch(interval_s=0.01)
    running = UpstreamCall()
    watch.watch(running, lambda: False)
    assert watch.abort_all() == 1 and running.aborted == SHUTDOWN
    late = UpstreamCall()
    watch.watch(late, lambda: False)
    peer = BrokenPeer(wait_for_close)
    upstream = Upstream({peer.url: 2}, timeouts={"chat": (5, 5)})
    try:
        with pytest.raises(ShuttingDown):
            upstream.request("POST", CHAT, group="chat", body=b"{}", call=late)
    finally:
        watch.unwatch(late)
        peer.close()
        upstream.close()
    assert late.aborted == SHUTDOWN and peer.requests == 0


def test_cancel_cuts_the_one_call_its_handle_names_though_its_request_id_is_shared():
    # A request id is the client's choice: two requests (two clients) may send the same one.
    watch = DisconnectWatch(interval_s=60)
    calls = [UpstreamCall(RequestRecord("req-1", "POST", CHAT, time.perf_counter())) for _ in range(2)]
    for call in calls:
        watch.watch(call)
    assert len({call.handle for call in calls}) == 2
    assert watch.cancel("req-1") is False and not any(call.aborted for call in calls)
    assert watch.cancel(calls[0].handle) is True
    assert (calls[0].aborted, calls[1].aborted) == (CANCELLED, None) and watch.calls() == [calls[1]]
    assert watch.cancel(calls[0].handle) is False  # cut once: no longer in flight
    watch.unwatch(calls[1])


def test_a_call_cancelled_on_the_page_raises_the_error_its_client_is_told():
    peer = BrokenPeer(wait_for_close)
    upstream = Upstream({peer.url: 2}, timeouts={"chat": (5, 5)})
    call = UpstreamCall()
    call.abort(CANCELLED)  # before it is sent: its connection is shut at once
    try:
        with pytest.raises(CancelledByOperator) as raised:
            upstream.request("POST", CHAT, group="chat", body=b"{}", call=call)
    finally:
        peer.close()
        upstream.close()
    error = raised.value
    assert (error.status, error.code, error.type) == (503, CANCELLED, "server_error")
    assert error.headers == {"x-should-retry": "false"}


def test_stall_clock_counts_only_a_write_in_progress():
    clock = Clock()
    stall = StallClock(30, clock=clock)
    clock.now += 100  # waiting on llama.cpp, between writes
    assert not stall.stalled()
    stall.writing()
    clock.now += 29.9
    assert not stall.stalled()
    clock.now += 0.1
    assert stall.stalled()
    stall.written()
    assert not stall.stalled()


def test_a_call_cut_between_connections_shuts_the_next_one_at_once():
    call = UpstreamCall()
    call.abort()
    ours, llama_side = socket.socketpair()
    with ours, llama_side:
        call.attach(ours)
        llama_side.settimeout(5)
        assert llama_side.recv(1) == b""  # llama.cpp sees its connection closed


def test_a_detached_socket_is_never_shut():
    call = UpstreamCall()
    ours, llama_side = socket.socketpair()
    with ours, llama_side:
        call.attach(ours)
        call.detach(ours)  # its connection went back to the pool
        call.abort()
        ours.sendall(b"x")
        llama_side.settimeout(5)
        assert llama_side.recv(1) == b"x"


def test_silent_stream_is_closed_when_the_client_leaves(make_app, live_gateway, caplog):
    def script(peer, conn):
        conn.sendall(SSE_HEAD + chunk(EVENT))  # then nothing: llama.cpp busy with a long prompt, say
        wait_for_close(peer, conn)

    peer = BrokenPeer(script)
    caplog.set_level(logging.INFO)
    try:
        parts = urlsplit(live_gateway(make_app(peer.url)))
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("POST", CHAT, body=json.dumps({"stream": True, "messages": [{"role": "user", "content": "x"}]}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.read1(65536).startswith(EVENT)
        left = time.monotonic()
        response.close()
        conn.close()
        assert peer.closed_by_client.wait(5), "the upstream stream stayed open after the client left"
        assert time.monotonic() - left < 1.5
    finally:
        peer.close()
    assert peer.requests == 1


@pytest.mark.parametrize("path, body", [
    (CHAT, {"messages": [{"role": "user", "content": "x"}]}),
    ("/v1/embeddings", {"input": "x"}),
])
def test_unanswered_request_is_closed_when_the_client_leaves(make_app, live_gateway, caplog, path, body):
    peer = BrokenPeer(wait_for_close)  # reads the request, then never answers
    caplog.set_level(logging.INFO)
    try:
        parts = urlsplit(live_gateway(make_app(peer.url)))
        payload = json.dumps(body).encode()
        with socket.create_connection((parts.hostname, parts.port), timeout=5) as client:
            client.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload))
            for _ in range(100):  # wait until the gateway has made its upstream call
                if peer.requests:
                    break
                time.sleep(0.01)
        left = time.monotonic()
        assert peer.closed_by_client.wait(5), "the upstream call stayed open after the client left"
        assert time.monotonic() - left < 1.5
        time.sleep(0.3)
    finally:
        peer.close()
    assert peer.requests == 1  # a call cut for a client that left is never retried
    lines = [record for record in caplog.records if record.getMessage() == "request"]
    assert lines and lines[-1].fields["status"] == 499 and lines[-1].fields["error"] == "client_closed_request"


@pytest.mark.llama
def test_llama_stops_generating_when_the_stream_client_leaves(slow_llama, make_app, live_gateway):
    # (A non-streamed generation is not cancelled by this llama.cpp build even when its connection closes:
    # the gateway closes it at once, as the fake-upstream tests above show, but llama.cpp finishes the work.)
    import requests

    slot_ctx = requests.get(slow_llama.url + "/props", timeout=5).json()["default_generation_settings"]["n_ctx"]
    assert LONG["max_tokens"] + 64 <= slot_ctx  # so only a cut can end it short of max_tokens
    predicted_before = llama_metric(slow_llama, "llamacpp:tokens_predicted_total")
    parts = urlsplit(live_gateway(make_app(slow_llama.url)))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({**LONG, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.read1(65536).startswith(b"data: ")  # a few events in
    wait_processing(slow_llama, 1, timeout=10)
    response.close()
    conn.close()
    # llama.cpp checks for a closed connection about once a second.
    wait_processing(slow_llama, 0, timeout=10)
    # A fast CPU could finish all the tokens within that wait, so llama.cpp's own count (a cancelled task's tokens
    # included) decides: a generation that ran to its end predicted exactly max_tokens.
    predicted = llama_metric(slow_llama, "llamacpp:tokens_predicted_total") - predicted_before
    assert predicted < LONG["max_tokens"], f"llama.cpp generated all {predicted:g} tokens for a client that left"
