"""Chat and text completions through the gateway against the real llama.cpp, streamed and not."""
import json

import pytest

from tests.clients import assert_openai_envelope

pytestmark = pytest.mark.llama

USER = [{"role": "user", "content": "Say hello"}]
# The demo model has random weights: it may emit end-of-text at any point unless told to ignore it.
EXACT = {"ignore_eos": True}


def sse_events(data: bytes) -> list:
    """Split an SSE body into its data payloads."""
    return [event[len(b"data: "):].decode() for event in data.split(b"\n\n") if event.startswith(b"data: ")]


def test_chat_completion(llama_client):
    response = llama_client.post("/v1/chat/completions",
                                 json={"model": "llama", "messages": USER, "max_tokens": 5, **EXACT})
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 5


def test_chat_stream_without_usage(llama_client):
    response = llama_client.post("/v1/chat/completions",
                                 json={"model": "llama", "messages": USER, "max_tokens": 4, "stream": True, **EXACT})
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    events = sse_events(response.get_data())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_stream_with_include_usage(llama_client):
    response = llama_client.post("/v1/chat/completions", json={
        "model": "llama", "messages": USER, "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}, **EXACT})
    events = sse_events(response.get_data())
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 4


def test_text_completion(llama_client):
    response = llama_client.post("/v1/completions", json={"model": "llama", "prompt": "Once", "max_tokens": 3, **EXACT})
    body = response.get_json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 3


def test_text_completion_stream(llama_client):
    response = llama_client.post("/v1/completions",
                                 json={"model": "llama", "prompt": "Once", "max_tokens": 3, "stream": True, **EXACT})
    events = sse_events(response.get_data())
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 3


def test_token_id_prompt(llama_client):
    response = llama_client.post("/v1/completions", json={"prompt": [1, 300, 301], "max_tokens": 2})
    assert response.status_code == 200
    assert response.get_json()["usage"]["prompt_tokens"] == 3


def test_llama_extra_fields_reach_llama(llama_client):
    # n_predict caps the length and a grammar forces the text: both only work if passed through untouched.
    response = llama_client.post("/v1/completions", json={
        "prompt": "x", "n_predict": 3, "grammar": 'root ::= "ab" "ab" "ab" "ab"', "cache_prompt": False,
        "top_k": 1, "min_p": 0.05, "samplers": ["top_k"], "ignore_eos": True})
    body = response.get_json()
    assert response.status_code == 200
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["text"].startswith("a")
    assert set(body["choices"][0]["text"]) <= {"a", "b"}


def test_json_schema_constrains_chat_output(llama_client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    # Room for the whole object: llama.cpp's JSON grammar allows only bounded runs of whitespace.
    response = llama_client.post("/v1/chat/completions",
                                 json={"messages": USER, "json_schema": schema, "max_tokens": 200, "temperature": 0})
    assert response.status_code == 200
    choice = response.get_json()["choices"][0]
    assert choice["finish_reason"] == "stop"  # the grammar closed the object; nothing was cut off
    output = json.loads(choice["message"]["content"])
    assert list(output) == ["ok"] and isinstance(output["ok"], bool)


def test_prompt_longer_than_context_is_400_from_llama(llama_client):
    response = llama_client.post("/v1/completions", json={"prompt": "a " * 5000, "max_tokens": 1})
    error = assert_openai_envelope(response, 400)
    assert error["code"] == "context_length_exceeded"
    assert "context" in error["message"]
