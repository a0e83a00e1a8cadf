"""A request's slot is given back however its upstream call ends: after llama.cpp answered an error, refused the
connection, or broke a stream, the next request of the model (one slot) gets its turn at once, not a queue timeout.
"""
import json

import pytest
import requests
from werkzeug import Response

from tests.apps import routed_app
from tests.clients import CHAT, HI, request_id_header
from tests.fakes import SSE_HEAD, BrokenPeer, chunk, unused_port_url

# llama.cpp's own error answer, and one content chunk of a chat stream.
SERVER_ERROR = {"error": {"code": 500, "message": "the model failed", "type": "server_error"}}
CONTENT = b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'


def answers_500(httpserver, closers):
    """An upstream that answers every chat request with llama.cpp's 500."""
    httpserver.expect_request(CHAT).respond_with_json(SERVER_ERROR, status=500)
    return httpserver.url_for("").rstrip("/")


def fails_mid_stream(httpserver, closers):
    """An upstream whose streams report a failure after their first chunk."""
    report = b"data: " + json.dumps(SERVER_ERROR).encode() + b"\n\n"
    httpserver.expect_request(CHAT).respond_with_handler(
        lambda request: Response([CONTENT, report], content_type="text/event-stream"))
    return httpserver.url_for("").rstrip("/")


def refuses(httpserver, closers):
    """An upstream nothing listens on."""
    return unused_port_url()


def cuts_streams(httpserver, closers):
    """An upstream that closes each stream after its first chunk."""
    peer = BrokenPeer(lambda peer, conn: conn.sendall(SSE_HEAD + chunk(CONTENT)))  # then it closes
    closers.append(peer.close)
    return peer.url


# name -> (upstream(httpserver, closers) -> its URL, whether the client asks for a stream)
FAILURES = {
    "500": (answers_500, False),
    "500 before a stream": (answers_500, True),
    "refused": (refuses, False),
    "error mid-stream": (fails_mid_stream, True),
    "stream cut": (cuts_streams, True),
}


def error_code(response) -> tuple:
    """(status, the error's code): from the JSON envelope, or from the error event that ended a stream."""
    if response.headers["Content-Type"].startswith("text/event-stream"):
        data = [line for line in response.content.split(b"\n") if line.startswith(b"data: ")]
        return response.status_code, json.loads(data[-1][len(b"data: "):])["error"]["code"]
    return response.status_code, response.json()["error"]["code"]


@pytest.mark.parametrize("failure", FAILURES, ids=FAILURES.keys())
def test_the_slot_is_given_back_after_an_upstream_failure(make_app, live_gateway, httpserver, access_log, failure):
    upstream, stream = FAILURES[failure]
    closers = []
    try:
        url = upstream(httpserver, closers)
        # One slot, and a queue timeout that a request still waiting for a slot that is never given back hits.
        app = routed_app(make_app, {"chat": [url]}, MODEL_SETTINGS="chat:slots=1", QUEUE_TIMEOUT_S="1")
        base = live_gateway(app)
        outcomes = []
        for number in range(2):
            name = f"failed-{number}"
            outcomes.append(error_code(requests.post(
                base + CHAT, json={"model": "chat", "messages": HI, "stream": stream}, timeout=30,
                headers=request_id_header(name))))
            assert access_log.line(name)["error"] != "queue_timeout"  # once its answer has been sent...
            [queue] = app.extensions["scheduler"].queues
            assert (queue.in_flight, queue.depth) == (0, 0), f"{name} kept its slot"  # ...its slot is free again
        first, second = outcomes
        assert first[1] and first[1] != "queue_timeout", first  # the upstream's failure, told in the envelope
        assert second == first  # the same failure, met at once: not a wait for a slot nobody gave back
    finally:
        for close in closers:
            close()
