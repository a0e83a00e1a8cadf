"""What the relay reads in a stream: llama.cpp's mid-stream errors, usage in any SSE framing, the body it rewrites
to ask for usage, and the cleanup of a stream's upstream call however its response is closed."""
import json
import logging
import math
import threading

import openai
import pytest
from werkzeug import Response
from werkzeug.test import EnvironBuilder

from tests.fakes import SSE_HEAD, BrokenPeer, chunk
from tests.metrics_helpers import scrape, value

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
STREAM_BODY = json.dumps({"model": "llama", "stream": True, "messages": MESSAGES})

EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
DONE = b"data: [DONE]\n\n"
# How llama.cpp builds before mid-2025 report a failure once a stream has begun (utils.hpp's
# server_sent_event(sink, "error", ...)), followed by [DONE] on the OpenAI routes.
ERROR_FIELD = b'error: {"code":500,"message":"llama.cpp ran out of memory","type":"server_error"}\n\n'
# How later builds report it (server-context.cpp: format_oai_sse(json {{"error", ...}})), with no [DONE].
ERROR_DATA = b'data: {"error":{"code":500,"message":"llama.cpp ran out of memory","type":"server_error"}}\n\n'


def serve_stream(httpserver, body: bytes):
    """The fake upstream answers the chat route with body as an SSE stream."""
    httpserver.expect_request(CHAT).respond_with_handler(
        lambda request: Response([body], content_type="text/event-stream"))


def stream_through(app, body=STREAM_BODY) -> bytes:
    """POST a chat stream through the app, read all of it and close it (as waitress does: the log line and the
    metrics are taken then)."""
    response = app.test_client().post(CHAT, data=body, content_type="application/json")
    assert response.status_code == 200, response.get_data()
    data = response.get_data()
    response.close()
    return data


def request_lines(caplog) -> list:
    """The fields of each request's log line."""
    return [record.fields for record in caplog.records if record.getMessage() == "request"]


# --- llama.cpp's own errors mid-stream ---

@pytest.mark.parametrize("tail", [ERROR_FIELD + DONE, ERROR_FIELD.replace(b"\n\n", b"\r\n\r\n"),
                                  ERROR_FIELD.rstrip(b"\n"), ERROR_DATA],
                         ids=["then [DONE]", "CRLF", "cut short", "data event"])
def test_llama_cpp_error_becomes_the_gateways_error_event_and_a_failure(fake_app, httpserver, caplog, tail):
    caplog.set_level(logging.INFO)
    serve_stream(httpserver, EVENT + tail)
    data = stream_through(fake_app)
    assert data.startswith(EVENT)
    error_event = data[len(EVENT):]
    assert error_event.startswith(b"data: ") and error_event.endswith(b"\n\n")  # the one event after EVENT
    assert json.loads(error_event[len(b"data: "):]) == {"error": {
        "message": "llama-server failed mid-stream: llama.cpp ran out of memory", "type": "upstream_error",
        "param": None, "code": "upstream_error"}}
    # The stream ends at the error, as the gateway's other mid-stream failures do: no [DONE] after it.
    assert DONE not in data and b"error:" not in data
    [line] = request_lines(caplog)
    assert line["status"] == 200 and line["error"] == "upstream_error"
    assert value(scrape(fake_app.test_client()), "gateway_upstream_errors_total", kind="5xx") == 1


@pytest.mark.parametrize("report", [b"error: <html>secret page</html>", b'error:{"message": ["not text"]}'])
def test_error_field_that_is_not_an_error_object_is_described_not_quoted(fake_app, httpserver, report):
    serve_stream(httpserver, EVENT + report + b"\n\n")
    data = stream_through(fake_app)
    message = json.loads(data[len(EVENT) + len(b"data: "):])["error"]["message"]
    assert message == "llama-server failed mid-stream: an error report that is not an error object"


def test_content_that_mentions_errors_is_not_an_error(fake_app, httpserver, caplog):
    caplog.set_level(logging.INFO)
    talk = b'data: {"choices":[{"index":0,"delta":{"content":"error"}}]}\n\n'
    serve_stream(httpserver, talk + EVENT + DONE)
    assert stream_through(fake_app) == talk + EVENT + DONE
    assert "error" not in request_lines(caplog)[0]


def test_openai_sdk_raises_on_llamacpp_error_field(fake_app, httpserver, live_gateway):
    serve_stream(httpserver, EVENT + ERROR_FIELD + DONE)
    client = openai.OpenAI(base_url=live_gateway(fake_app) + "/v1", api_key="x", max_retries=0, timeout=10)
    stream = client.chat.completions.create(model="llama", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="llama.cpp ran out of memory"):
        for _ in stream:
            pass
    client.close()


# --- usage in every SSE framing ---

CONTENT = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
FRAMINGS = {
    "lf": lambda event: event + b"\n\n",
    "crlf": lambda event: event + b"\r\n\r\n",
    "lf, no space": lambda event: event.replace(b"data: ", b"data:") + b"\n\n",
    "crlf, no space": lambda event: event.replace(b"data: ", b"data:") + b"\r\n\r\n",
}


@pytest.mark.parametrize("frame", FRAMINGS.values(), ids=FRAMINGS.keys())
@pytest.mark.parametrize("client_asks", [False, True], ids=["gateway asks", "client asks"])
def test_usage_is_read_and_stripped_in_any_framing(fake_app, httpserver, frame, client_asks):
    content, usage, done = frame(CONTENT), frame(USAGE), frame(b"data: [DONE]")
    serve_stream(httpserver, content + usage + done)
    body = {"stream": True, "messages": MESSAGES}
    if client_asks:
        body["stream_options"] = {"include_usage": True}
    # The client gets exactly the stream it asked for, in the upstream's own framing.
    assert stream_through(fake_app, json.dumps(body)) == content + (usage if client_asks else b"") + done
    samples = scrape(fake_app.test_client())
    assert value(samples, "gateway_tokens_total", kind="prompt") == 3
    assert value(samples, "gateway_tokens_total", kind="completion") == 2


# --- the body rewritten to ask for usage ---

def sent_body(httpserver) -> bytes:
    [(request, _)] = httpserver.log
    return request.get_data()


def test_body_with_lone_surrogate_and_huge_number_is_spliced_not_re_encoded(fake_app, httpserver):
    # Valid JSON that json.dumps(...).encode() could not carry: a lone surrogate escape, and a number that
    # Python reads as inf (and would write back as Infinity, which is not JSON).
    raw = b'{"stream": true, "messages": [{"role": "user", "content": "\\ud800"}], "x_scale": 1e999}\n'
    serve_stream(httpserver, EVENT + DONE)
    assert stream_through(fake_app, raw) == EVENT + DONE
    assert sent_body(httpserver) == raw[:-2] + b',"stream_options":{"include_usage":true}}\n'


def test_client_stream_options_keep_their_other_members_as_written(fake_app, httpserver):
    options = b'{ "x_keep" : {"a": [1, "}\\"", 1e999]} , "include_usage" : false }'
    raw = b'{"stream": true, "stream_options": %s, "messages": [{"role": "user", "content": "hi"}]}' % options
    serve_stream(httpserver, EVENT + DONE)
    stream_through(fake_app, raw)
    sent = sent_body(httpserver)
    spliced = options[:-1] + b',"include_usage":true' + options[-1:]
    assert sent == raw.replace(options, spliced)
    parsed = json.loads(sent)
    assert parsed["stream_options"]["include_usage"] is True and math.isinf(parsed["stream_options"]["x_keep"]["a"][2])


def test_last_of_duplicate_stream_options_is_the_one_amended(fake_app, httpserver):
    raw = (b'{"stream": true, "stream_options": {"x_first": 1}, "messages": [{"role": "user", "content": "hi"}], '
           b'"stream_options": {"x_last": 2}}')
    serve_stream(httpserver, EVENT + DONE)
    stream_through(fake_app, raw)
    assert sent_body(httpserver) == raw[:-2] + b',"include_usage":true}}'


def test_utf8_with_a_byte_order_mark_is_spliced_too(fake_app, httpserver):
    raw = "\ufeff".encode() + json.dumps({"stream": True, "stream_options": {"x_keep": 1},
                                          "messages": MESSAGES}).encode()
    serve_stream(httpserver, EVENT + DONE)
    assert stream_through(fake_app, raw) == EVENT + DONE
    assert json.loads(sent_body(httpserver).decode("utf-8-sig"))["stream_options"] == {"x_keep": 1,
                                                                                        "include_usage": True}


@pytest.mark.llama
def test_llamacpp_keeps_the_last_duplicate_key_so_the_usage_flag_wins(llama_app):
    # The client said no to usage: llama.cpp must still send it (the gateway's appended member wins), and
    # the client must still not see it.
    body = json.dumps({"stream": True, "messages": MESSAGES, "max_tokens": 3, "ignore_eos": True,
                       "stream_options": {"include_usage": False}})
    data = stream_through(llama_app, body)
    chunks = [json.loads(event[len(b"data: "):]) for event in data.split(b"\n\n") if event.startswith(b"data: {")]
    assert data.endswith(DONE) and chunks
    assert all(chunk["choices"] and "usage" not in chunk for chunk in chunks)
    samples = scrape(llama_app.test_client())
    assert value(samples, "gateway_tokens_total", kind="completion") == 3
    assert value(samples, "gateway_tokens_total", kind="prompt") > 0


@pytest.mark.llama
def test_llamacpp_judges_a_lone_surrogate_not_the_gateway(llama_app):
    raw = b'{"stream": true, "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'
    response = llama_app.test_client().post(CHAT, data=raw, content_type="application/json")
    assert response.status_code == 400  # llama.cpp's verdict, passed on; never the gateway's own 500
    assert "surrogate" in response.get_json()["error"]["message"]


# --- cleanup however the response is closed ---

@pytest.mark.parametrize("reads", [0, 1, None], ids=["never read", "read in part", "read to the end"])
def test_closing_the_response_lets_go_of_the_upstream_once(make_app, reads):
    upstream_closed = threading.Event()

    def script(peer, conn):
        conn.sendall(SSE_HEAD + chunk(EVENT))
        if reads is None:
            conn.sendall(chunk(DONE) + chunk(b""))
        conn.settimeout(5)
        if conn.recv(1) == b"":  # the gateway closed its end
            upstream_closed.set()

    peer = BrokenPeer(script)
    try:
        app = make_app(peer.url)
        environ = EnvironBuilder(path=CHAT, method="POST", data=STREAM_BODY,
                                 content_type="application/json").get_environ()
        body = app(environ, lambda status, headers, exc_info=None: None)
        if reads is None:
            assert b"".join(body) == EVENT + DONE
        elif reads:
            assert next(iter(body)) == EVENT
        body.close()
        assert upstream_closed.wait(5), "the upstream response was left open"
        assert not app.extensions["disconnect_watch"]._watched
        assert value(scrape(app.test_client()), "gateway_open_streams") == 0
    finally:
        peer.close()
