"""Anthropic's Messages API streams end to end with the anthropic SDK: text, the final message and its usage
against real llama.cpp servers, the model name in routed mode, and broken streams from fake upstreams."""
import json

import anthropic
import pytest
import requests
from werkzeug import Response

from service.models.demo_model import write_demo_model
from tests.apps import DEFAULT_KEY, DEFAULT_KEY_LIMITS, routed_app
from tests.clients import ANTHROPIC_VERSION, GREEDY, HI, anthropic_sdk, assert_anthropic_envelope, reset_in
from tests.fakes import SSE_HEAD, BrokenPeer, chunk
from tests.metrics_helpers import scrape, value
from tests.processes import start_llama

pytestmark = [pytest.mark.llama, pytest.mark.usefixtures("no_anthropic_environment")]

MISSING_START = ("the stream has no message_start: llama.cpp sends it only with the first token's text, and the "
                 "demo model's first greedy token is half a UTF-8 character, which llama.cpp holds back; the gateway "
                 "must supply message_start (and its input tokens) itself - see the report on AnthropicEvents")


@pytest.fixture(scope="module")
def ascii_llama(tmp_path_factory):
    """A real llama.cpp on a demo model whose greedy answers are ASCII letters (seed 2; seed 0's begin with half a
    UTF-8 character), so that its streams open with message_start as llama.cpp sends it."""
    supervisor = start_llama(write_demo_model(str(tmp_path_factory.mktemp("ascii") / "ascii.gguf"), seed=2,
                                              embedding_size=32))
    yield supervisor
    supervisor.stop()


def prompt_tokens(usage) -> int:
    """The prompt's tokens as the SDK reports them (llama.cpp names the cached part cache_read_input_tokens)."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


def test_stream_text_final_message_headers_and_counted_usage(make_app, live_gateway, ascii_llama, access_log):
    app = make_app(ascii_llama.url, **DEFAULT_KEY_LIMITS)
    with anthropic_sdk(live_gateway(app)).messages.stream(model="demo", messages=HI, max_tokens=4, **GREEDY) as stream:
        headers = stream.response.headers
        assert headers["request-id"] == headers["x-request-id"]
        assert headers["anthropic-ratelimit-requests-remaining"] == "49"
        assert 55 <= reset_in(headers["anthropic-ratelimit-requests-reset"]) <= 61  # whole seconds, rounded up
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text and message.content[0].text == text
    assert text.isascii(), "the seed-2 demo model no longer answers in ASCII: pick another seed for ascii_llama"
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 4
    [line] = access_log.wait(1)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (prompt_tokens(message.usage), 4)
    assert line["status"] == 200 and "error" not in line
    samples = scrape(app.test_client())
    assert value(samples, "gateway_tokens_total", kind="prompt") == prompt_tokens(message.usage) > 0
    assert value(samples, "gateway_tokens_total", kind="completion") == 4


def test_tokens_spent_by_a_stream_exhaust_the_tpm_limit(make_app, live_gateway, ascii_llama, access_log):
    client = anthropic_sdk(live_gateway(make_app(ascii_llama.url, **{**DEFAULT_KEY_LIMITS, "RATE_LIMIT_TPM": "20"})))
    events = list(client.messages.create(model="demo", messages=HI, max_tokens=2, stream=True, **GREEDY))
    assert events[0].type == "message_start" and prompt_tokens(events[0].message.usage) > 20
    access_log.wait(1)  # the stream's tokens are counted when it has been sent
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="demo", messages=HI, max_tokens=1, stream=True)
    assert_anthropic_envelope(caught.value, "rate_limit_error", "tokens per minute")
    assert caught.value.response.headers["anthropic-ratelimit-tokens-remaining"] == "0"


def test_routed_mode_gives_back_the_model_name_the_client_sent(make_app, live_gateway, llama, ascii_llama):
    base = live_gateway(routed_app(make_app, {"small": [llama.url], "smaller": [ascii_llama.url]},
                                   **DEFAULT_KEY_LIMITS))
    client = anthropic_sdk(base)
    for model in ("small", "smaller"):
        assert client.messages.create(model=model, messages=HI, max_tokens=1).model == model
    events = list(client.messages.create(model="smaller", messages=HI, max_tokens=2, stream=True, **GREEDY))
    assert events[0].type == "message_start" and events[0].message.model == "smaller"
    raw = requests.post(base + "/v1/messages", headers={"x-api-key": DEFAULT_KEY, **ANTHROPIC_VERSION}, timeout=30,
                        json={"model": "smaller", "messages": HI, "max_tokens": 2, "stream": True, "temperature": 0})
    assert raw.content.count(b'"model":') == raw.content.count(b'"model":"smaller"') == 1  # in message_start


def test_a_stream_llama_cpp_opens_without_message_start_still_gives_the_sdk_its_message(
        make_app, live_gateway, llama, access_log):
    # KNOWN BUG (fails until the gateway supplies message_start): llama.cpp sends message_start only in the partial
    # result of the first token, and sends no partial for a token that is half a UTF-8 character (an emoji or
    # CJK character in byte-fallback vocabularies; every greedy answer of the seed-0 demo model).
    client = anthropic_sdk(live_gateway(make_app(llama.url, **DEFAULT_KEY_LIMITS)))
    events = list(client.messages.create(model="demo", messages=HI, max_tokens=3, stream=True, **GREEDY))
    assert events[0].type == "message_start", MISSING_START + f"; events: {[event.type for event in events]}"
    with client.messages.stream(model="demo", messages=HI, max_tokens=3, **GREEDY) as stream:
        message = stream.get_final_message()
    assert message.usage.output_tokens == 3
    line = access_log.wait(2)[1]
    assert line["prompt_tokens"] == prompt_tokens(message.usage) > 0, "the stream's prompt tokens went uncounted"


# --- broken streams, from fake upstreams ---

START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m1","type":"message",'
         b'"role":"assistant","content":[],"model":"demo","stop_reason":null,"stop_sequence":null,'
         b'"usage":{"cache_read_input_tokens":40,"input_tokens":2,"output_tokens":0}}}\n\n')
BLOCK = (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
         b'"content_block":{"type":"text","text":""}}\n\n')
DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
         b'"delta":{"type":"text_delta","text":"Hel"}}\n\n')
REPORT = {"code": 500, "message": "llama.cpp ran out of memory", "type": "server_error"}
# llama.cpp's ways of reporting a failure once a stream has begun: later builds send a data event with an error
# member (as an `event: error` on Anthropic's routes), earlier ones an `error:` field.
REPORTS = {
    "data event": b"data: " + json.dumps({"error": REPORT}).encode() + b"\n\n",
    "event: error": b"event: error\ndata: " + json.dumps({"error": REPORT}).encode() + b"\n\n",
    "error field": b"error: " + json.dumps(REPORT).encode() + b"\n\n",
}
STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def read_events(stream) -> tuple:
    """(the SDK's events before it raised, the APIStatusError it raised) while iterating stream."""
    events = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        for event in stream:
            events.append(event)
    return events, caught.value


def test_a_stream_cut_mid_way_ends_with_an_error_event_the_sdk_raises(make_app, live_gateway, access_log):
    peer = BrokenPeer(lambda peer, conn: conn.sendall(SSE_HEAD + chunk(START + BLOCK + DELTA)))  # then it closes
    try:
        base = live_gateway(make_app(peer.url, **DEFAULT_KEY_LIMITS))
        events, error = read_events(anthropic_sdk(base).messages.create(model="demo", messages=HI, max_tokens=9,
                                                                        stream=True))
        assert [event.type for event in events] == ["message_start", "content_block_start", "content_block_delta"]
        assert error.status_code == 200  # the stream had begun: the error comes as its last event
        assert_anthropic_envelope(error, "api_error", "llama-server broke off the stream")
        [line] = access_log.wait(1)
        assert line["status"] == 200 and line["error"] == "upstream_bad_response"
        assert line["prompt_tokens"] == 42  # what message_start reported before the break
    finally:
        peer.close()


@pytest.mark.parametrize("report", REPORTS.values(), ids=REPORTS.keys())
def test_llama_cpp_error_mid_stream_becomes_anthropics_error_event(make_app, live_gateway, httpserver,
                                                                    access_log, report):
    httpserver.expect_request("/v1/messages").respond_with_handler(
        lambda request: Response([START, BLOCK + DELTA, report + STOP], content_type="text/event-stream"))
    base = live_gateway(make_app(httpserver.url_for("").rstrip("/"), **DEFAULT_KEY_LIMITS))
    events, error = read_events(anthropic_sdk(base).messages.create(model="demo", messages=HI, max_tokens=9,
                                                                    stream=True))
    assert [event.type for event in events] == ["message_start", "content_block_start", "content_block_delta"]
    assert_anthropic_envelope(error, "api_error", "llama.cpp ran out of memory")
    assert access_log.wait(1)[0]["error"] == "upstream_error"
    # On the wire: exactly one `event: error` in Anthropic's envelope, and nothing after it.
    raw = requests.post(base + "/v1/messages", headers={"x-api-key": DEFAULT_KEY, **ANTHROPIC_VERSION}, timeout=30,
                        json={"model": "demo", "messages": HI, "max_tokens": 9, "stream": True}).content
    assert raw.startswith(START + BLOCK + DELTA)
    tail = raw[len(START + BLOCK + DELTA):]
    assert tail.startswith(b"event: error\ndata: ") and tail.endswith(b"\n\n") and tail.count(b"\n\n") == 1
    assert json.loads(tail[len(b"event: error\ndata: "):]) == {"type": "error", "error": {
        "type": "api_error", "message": "llama-server failed mid-stream: llama.cpp ran out of memory"}}


# --- the stream's end: message_stop reaches the client ---

BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
MESSAGE_DELTA = (b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
                 b'"stop_sequence":null},"usage":{"output_tokens":1}}\n\n')
WHOLE = START + BLOCK + DELTA + BLOCK_STOP + MESSAGE_DELTA + STOP
# The same stream as the upstream's writes may cut it: the relay must pass every event whatever the cuts.
CUTS = {
    "an event a chunk": [START, BLOCK, DELTA, BLOCK_STOP, MESSAGE_DELTA, STOP],
    "usage and stop together": [START, BLOCK + DELTA + BLOCK_STOP, MESSAGE_DELTA + STOP],
    "stop cut in two": [START + BLOCK + DELTA + BLOCK_STOP + MESSAGE_DELTA + STOP[:20], STOP[20:]],
    "one chunk": [WHOLE],
}
EVENT_TYPES = ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
               "message_delta", "message_stop"]


def event_names(raw: bytes) -> list:
    """The `event:` names of a raw SSE body, in order."""
    return [line[len(b"event: "):].decode() for line in raw.split(b"\n") if line.startswith(b"event: ")]


@pytest.mark.parametrize("cut", CUTS.values(), ids=CUTS.keys())
def test_a_whole_stream_reaches_the_client_as_sent_message_stop_last(make_app, live_gateway, httpserver, cut):
    httpserver.expect_request("/v1/messages").respond_with_handler(
        lambda request: Response(cut, content_type="text/event-stream"))
    base = live_gateway(make_app(httpserver.url_for("").rstrip("/"), **DEFAULT_KEY_LIMITS))
    raw = requests.post(base + "/v1/messages", headers={"x-api-key": DEFAULT_KEY, **ANTHROPIC_VERSION}, timeout=30,
                        json={"model": "demo", "messages": HI, "max_tokens": 9, "stream": True}).content
    assert raw == WHOLE, event_names(raw)
    events = list(anthropic_sdk(base).messages.create(model="demo", messages=HI, max_tokens=9, stream=True))
    assert [event.type for event in events] == EVENT_TYPES


@pytest.mark.parametrize("upstream", ["ascii_llama", "llama"])
def test_llama_cpp_streams_end_with_message_stop(make_app, live_gateway, request, upstream):
    # ascii_llama's streams open with llama.cpp's own message_start; llama's with the gateway's (its editor).
    base = live_gateway(make_app(request.getfixturevalue(upstream).url, **DEFAULT_KEY_LIMITS))
    raw = requests.post(base + "/v1/messages", headers={"x-api-key": DEFAULT_KEY, **ANTHROPIC_VERSION}, timeout=30,
                        json={"model": "demo", "messages": HI, "max_tokens": 3, "stream": True, "temperature": 0})
    names = event_names(raw.content)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names
    assert names.count("message_stop") == 1 and raw.content.endswith(b"\n\n")
    events = list(anthropic_sdk(base).messages.create(model="demo", messages=HI, max_tokens=3, stream=True, **GREEDY))
    assert events[-1].type == "message_stop", [event.type for event in events]
