"""The API families: each one's envelope, statuses, rate-limit headers, usage and stream events."""
import json
import re
from datetime import datetime, timezone

import pytest

from service.families import ANTHROPIC, LLAMA, OPENAI, RESPONSES, RateState, anthropic_events
from service.families.anthropic_events import AnthropicEvents
from service.families.catalog import duration
from service.families.family import StreamRequest
from service.proxy import sse
from service.policy.limits import Limits


def test_openai_envelope_keeps_llama_cpp_types_and_names_the_param():
    assert OPENAI.error_body(400, "bad", param="temperature") == {"error": {
        "message": "bad", "type": "invalid_request_error", "param": "temperature", "code": None}}
    assert OPENAI.error_body(501, "no", type="not_supported_error")["error"]["type"] == "not_supported_error"
    assert OPENAI.status(503, "upstream_unavailable") == 503


@pytest.mark.parametrize("status, code, shown, kind", [
    (400, None, 400, "invalid_request_error"), (401, "invalid_api_key", 401, "authentication_error"),
    (403, None, 403, "permission_error"), (404, "model_not_found", 404, "not_found_error"),
    (413, None, 413, "request_too_large"), (429, "rate_limit_exceeded", 429, "rate_limit_error"),
    (500, "internal_error", 500, "api_error"), (504, "upstream_timeout", 504, "timeout_error"),
    (503, "loading", 529, "overloaded_error"), (502, "upstream_unavailable", 529, "overloaded_error"),
    (502, "upstream_bad_response", 502, "api_error"), (415, None, 415, "invalid_request_error"),
])
def test_anthropic_envelope_uses_anthropics_types_and_statuses(status, code, shown, kind):
    body = ANTHROPIC.error_body(status, "words", type="server_error", code=code)
    assert body == {"type": "error", "error": {"type": kind, "message": "words"}}
    assert ANTHROPIC.status(status, code) == shown


def test_stream_error_events_per_family():
    openai = OPENAI.events(OPENAI).error_event(502, "broke", code="upstream_bad_response")
    assert openai.startswith(b"data: {") and json.loads(openai[6:])["error"]["message"] == "broke"
    anthropic = ANTHROPIC.events(ANTHROPIC).error_event(502, "broke", code="upstream_bad_response")
    event, data = anthropic.split(b"\n", 1)
    assert event == b"event: error" and anthropic.endswith(b"\n\n")
    assert json.loads(data[6:]) == {"type": "error", "error": {"type": "api_error", "message": "broke"}}


def test_rate_headers_per_family():
    state = RateState(Limits(rpm=10, tpm=100), requests=3, requests_reset_s=5.5, tokens=40, tokens_reset_s=59)
    assert OPENAI.rate_headers(state) == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "7",
        "x-ratelimit-reset-requests": "5.5s", "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "60", "x-ratelimit-reset-tokens": "59s"}
    anthropic = ANTHROPIC.rate_headers(state)
    assert anthropic["anthropic-ratelimit-requests-limit"] == "10"
    assert anthropic["anthropic-ratelimit-requests-remaining"] == "7"
    assert anthropic["anthropic-ratelimit-tokens-remaining"] == "60"
    reset = anthropic["anthropic-ratelimit-requests-reset"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", reset)
    ahead = datetime.strptime(reset, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) - datetime.now(timezone.utc)
    assert 5.4 <= ahead.total_seconds() <= 7  # 5.5 s, rounded up to whole seconds
    assert OPENAI.rate_headers(RateState(Limits(concurrent=2), 1, 0, 0, 0)) == {}


def test_duration_is_openais_format():
    assert [duration(s) for s in (0.02, 1, 1.5, 360, 61.25)] == ["20ms", "1s", "1.5s", "6m0s", "1m1.25s"]


@pytest.mark.parametrize("family, answer, counts", [
    (OPENAI, {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}, (3, 4)),
    (OPENAI, {"choices": []}, (None, None)),
    (RESPONSES, {"usage": {"input_tokens": 5, "output_tokens": 6}}, (5, 6)),
    (RESPONSES, {"type": "response.completed", "response": {"usage": {"input_tokens": 5, "output_tokens": 6}}},
     (5, 6)),
    (ANTHROPIC, {"usage": {"input_tokens": 1, "cache_read_input_tokens": 53, "output_tokens": 5}}, (54, 5)),
    (ANTHROPIC, {"type": "message_start", "message": {"usage": {"input_tokens": 2, "output_tokens": 0}}}, (2, 0)),
    (ANTHROPIC, {"type": "message_delta", "usage": {"output_tokens": 7}}, (None, 7)),
    (LLAMA, {"results": [], "usage": {"prompt_tokens": 9, "total_tokens": 9}}, (9, None)),
    (LLAMA, {"content": "x", "tokens_evaluated": 11, "tokens_predicted": 12}, (11, 12)),
    (OPENAI, {"usage": {"prompt_tokens": True, "completion_tokens": "4"}}, (None, None)),
])
def test_usage_is_read_where_each_family_reports_it(family, answer, counts):
    assert family.usage.read(answer) == counts


def _responses_events(*payloads):
    editor = RESPONSES.events(RESPONSES)
    edited = [editor.edit(f"event: {p['type']}\ndata: {json.dumps(p, separators=(',', ':'))}".encode())
              for p in payloads]
    return editor, [json.loads(event.partition(b"data:")[2]) for event in edited], edited


def test_responses_events_get_sequence_and_indexes_and_keep_the_rest():
    payloads = [
        {"type": "response.created", "response": {"id": "r"}},
        {"type": "response.output_item.added", "item": {"id": "m1", "type": "message"}},
        {"type": "response.content_part.added", "item_id": "m1", "part": {"type": "output_text"}},
        {"type": "response.output_text.delta", "item_id": "m1", "delta": "\"output_index\": 9"},
        {"type": "response.output_item.done", "item": {"id": "m1"}},
        {"type": "response.output_item.added", "item": {"id": "f2", "type": "function_call"}},
        {"type": "response.function_call_arguments.delta", "item_id": "f2", "delta": "{}"},
        {"type": "response.completed", "response": {"id": "r"}},
    ]
    _, events, edited = _responses_events(*payloads)
    assert [e["sequence_number"] for e in events] == list(range(8))
    assert [e.get("output_index") for e in events] == [None, 0, 0, 0, 0, 1, 1, None]
    assert [e.get("content_index") for e in events] == [None, None, 0, 0, None, None, None, None]
    for payload, event in zip(payloads, events):
        assert {key: event[key] for key in payload} == payload  # nothing of llama.cpp's is changed
    assert edited[0].startswith(b"event: response.created\ndata: {")


def test_responses_events_keep_fields_llama_cpp_already_sends():
    _, events, _ = _responses_events({"type": "response.output_text.delta", "item_id": "m", "output_index": 3,
                                      "content_index": 2, "sequence_number": 40, "delta": "x"})
    assert (events[0]["output_index"], events[0]["content_index"], events[0]["sequence_number"]) == (3, 2, 40)


def test_responses_error_event_is_the_apis_own():
    editor, _, _ = _responses_events({"type": "response.created", "response": {}})
    event = editor.error_event(502, "llama-server broke off the stream", code="upstream_bad_response")
    assert event.startswith(b"event: error\ndata: ")
    assert json.loads(event.partition(b"data: ")[2]) == {
        "type": "error", "code": "upstream_bad_response", "message": "llama-server broke off the stream",
        "param": None, "sequence_number": 1}


def test_responses_editor_passes_what_is_not_json():
    editor = RESPONSES.events(RESPONSES)
    assert editor.edit(b": ping") == b": ping"
    assert editor.edit(b"data: [DONE]") == b"data: [DONE]"


# Anthropic stream events as the relay hands them to the editor: one at a time, without the blank line after it.
MESSAGE_START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m1","type":"message",'
                 b'"role":"assistant","content":[],"model":"demo","usage":{"input_tokens":5,"output_tokens":0}}}')
BLOCK_START = (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
               b'"content_block":{"type":"text","text":""}}')
BLOCK_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
               b'"delta":{"type":"text_delta","text":"Hel"}}')


def anthropic_editor(counted):
    """(an AnthropicEvents for a request of model "chat" whose token count answers counted, the paths asked)."""
    asked = []

    def ask(path):
        asked.append(path)
        return counted

    return AnthropicEvents(ANTHROPIC, StreamRequest(model="chat", ask=ask)), asked


def split(edited: bytes) -> list:
    """The events in what the editor returned (the relay adds the blank line after the last one)."""
    return [event for event, _ in sse.split_events(edited)]


def test_anthropic_stream_opening_with_message_start_passes_untouched():
    editor, asked = anthropic_editor({"input_tokens": 17})
    assert ANTHROPIC.events is AnthropicEvents and editor.edits
    assert editor.edit(MESSAGE_START) == MESSAGE_START
    assert asked == []  # llama.cpp reported the input tokens itself: nothing to count
    assert editor.edit(BLOCK_START) == BLOCK_START


def test_anthropic_stream_opening_without_message_start_gets_one_with_counted_input_tokens():
    editor, asked = anthropic_editor({"input_tokens": 17})
    start, block = split(editor.edit(BLOCK_START))
    assert block == BLOCK_START
    assert start.startswith(b"event: message_start\ndata: ")
    payload = sse.data_json(start)
    assert payload["type"] == "message_start"
    message = payload["message"]
    assert message["usage"] == {"input_tokens": 17, "output_tokens": 0}
    assert message["model"] == "chat"  # the client's name for it, not llama.cpp's
    assert (message["type"], message["role"], message["content"]) == ("message", "assistant", [])
    assert message["id"].startswith("msg_")
    assert asked == ["/v1/messages/count_tokens"]
    assert editor.edit(BLOCK_DELTA) == BLOCK_DELTA and asked == ["/v1/messages/count_tokens"]  # counted once


@pytest.mark.parametrize("counted", [None, {"error": {"message": "no"}}, {"input_tokens": "12"},
                                     {"input_tokens": True}],
                         ids=["count failed", "error answer", "a string", "a bool"])
def test_anthropic_stream_goes_on_with_zero_input_tokens_when_the_count_fails(counted):
    editor, asked = anthropic_editor(counted)
    start, block = split(editor.edit(BLOCK_START))
    assert sse.data_json(start)["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert block == BLOCK_START and asked == ["/v1/messages/count_tokens"]
    assert editor.edit(BLOCK_DELTA) == BLOCK_DELTA


def test_a_ping_comment_before_the_first_event_does_not_open_the_anthropic_stream():
    editor, asked = anthropic_editor({"input_tokens": 3})
    assert editor.edit(b": ping") == b": ping"
    assert editor.edits and asked == []
    start, block = split(editor.edit(BLOCK_START))  # the first event still gets its message_start
    assert sse.data_json(start)["type"] == "message_start" and block == BLOCK_START


def test_an_opened_anthropic_stream_is_no_longer_edited_nor_parsed(monkeypatch):
    editor, asked = anthropic_editor({"input_tokens": 3})
    editor.edit(BLOCK_START)
    assert not editor.edits  # the relay stops handing it events to parse

    def parsed(event):
        raise AssertionError(f"an opened stream's event was parsed: {event!r}")

    monkeypatch.setattr(anthropic_events.sse, "data_json", parsed)
    assert editor.edit(BLOCK_START) == BLOCK_START  # no second message_start
    assert editor.edit(BLOCK_DELTA) == BLOCK_DELTA
    assert asked == ["/v1/messages/count_tokens"]
