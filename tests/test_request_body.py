"""Bad request bodies get a 400 (or 415) naming the problem, and never reach llama.cpp."""
import json

import pytest

from tests.clients import assert_openai_envelope

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
USER = [{"role": "user", "content": "hi"}]


def tool_call_message(call):
    """An assistant message that made one tool call."""
    return {"role": "assistant", "content": None, "tool_calls": [call]}


@pytest.mark.parametrize("path, body, param, words", [
    (CHAT, {}, "messages", "Missing data"),
    (CHAT, {"messages": "hi"}, "messages", "list"),
    (CHAT, {"messages": []}, "messages", "minimum length"),
    (CHAT, {"messages": [{"content": "hi"}]}, "messages[0].role", "Missing data"),
    (CHAT, {"messages": USER, "temperature": "hot"}, "temperature", "number"),
    (CHAT, {"messages": USER, "temperature": "0.5"}, "temperature", "number"),
    (CHAT, {"messages": USER, "temperature": True}, "temperature", "number"),
    (CHAT, {"messages": USER, "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    (CHAT, {"messages": USER, "max_tokens": 1.5}, "max_tokens", "integer"),
    (CHAT, {"messages": USER, "stream": "yes"}, "stream", "boolean"),
    (CHAT, {"messages": USER, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "boolean"),
    (CHAT, {"messages": USER, "stop": [1]}, "stop", "string"),
    (CHAT, {"messages": USER, "top_p": 2}, "top_p", "less than or equal to 1"),
    # llama.cpp would answer these itself: an overflowed token count, n > 1 with its own message.
    (CHAT, {"messages": USER, "max_tokens": 10**18}, "max_tokens", "less than or equal to 2147483647"),
    (CHAT, {"messages": USER, "max_completion_tokens": 2**31}, "max_completion_tokens", "2147483647"),
    (CHAT, {"messages": USER, "n": 5}, "n", "one choice per request"),
    # llama.cpp answers these with a 500: a string field it reads that is not one (null included), a text part
    # without its text, a tool or tool call that is not a named function, token ids out of the vocabulary's range.
    (CHAT, {"messages": [{"role": 7, "content": "hi"}]}, "messages[0].role", "string"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "name": None}]}, "messages[0].name", "null"),
    (CHAT, {"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]}, "messages[0].tool_call_id", "string"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "text"),
    (CHAT, {"messages": [{"role": "user", "content": [5]}]}, "messages[0].content[0]", "content block"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    (CHAT, {"messages": [tool_call_message({"id": "a", "function": {"name": "f", "arguments": "{}"}})]},
     "messages[0].tool_calls[0].type", "Missing data"),
    (CHAT, {"messages": [tool_call_message({"type": "function", "function": {"arguments": "{}"}})]},
     "messages[0].tool_calls[0].function.name", "Missing data"),
    (CHAT, {"messages": [tool_call_message({"type": "function", "function": {"name": "f"}})]},
     "messages[0].tool_calls[0].function.arguments", "Missing data"),
    (CHAT, {"messages": [tool_call_message({"type": "custom", "custom": {"name": "f", "input": "x"}})]},
     "messages[0].tool_calls[0].type", "function only, not custom"),
    (CHAT, {"messages": USER, "tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type",
     "function only, not custom"),
    (CHAT, {"messages": USER, "tools": [{"function": {"name": "f"}}]}, "tools[0].type", "Missing data"),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, "tools[0].function", "Missing data"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"description": "d"}}]},
     "tools[0].function.name", "Missing data"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "description": None}}]},
     "tools[0].function.description", "null"),
    ("/apply-template", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0].text", "text"),
    ("/v1/responses", {"input": "hi", "tools": [{"type": "function"}]}, "tools[0].name", "needs its name"),
    ("/detokenize", {"tokens": [5, -1]}, "tokens[1]", "greater than or equal to 0"),
    (COMPLETIONS, {}, "prompt", "Missing data"),
    (COMPLETIONS, {"prompt": {"text": "hi"}}, "prompt", "string"),
    (COMPLETIONS, {"prompt": []}, "prompt", "string"),
    (EMBEDDINGS, {}, "input", "Missing data"),
    (EMBEDDINGS, {"input": ""}, "input", "empty"),
    (EMBEDDINGS, {"input": []}, "input", "non-empty"),
    (EMBEDDINGS, {"input": ["a", ""]}, "input[1]", "non-empty"),
    (EMBEDDINGS, {"input": 42}, "input", "string"),
    (EMBEDDINGS, {"input": [True, False]}, "input[0]", "token ids"),
    (EMBEDDINGS, {"input": "hi", "encoding_format": "hex"}, "encoding_format", "float, base64"),
])
def test_invalid_fields_are_400_with_param(fake_client, httpserver, path, body, param, words):
    error = assert_openai_envelope(fake_client.post(path, json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"] and param in error["message"]
    assert httpserver.log == []


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"   ", "empty"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object, not a JSON array"),
    (b'"text"', "not a JSON string"),
    (b"null", "not a JSON null"),
    (b'{"messages": NaN}', "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    # UTF-16, and a surrogate encoded as bytes (json.loads alone would take both): llama.cpp reads UTF-8 only.
    ('{"messages": []}'.encode("utf-16"), "not UTF-8"),
    (b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "not UTF-8"),
    (b"[" * 100000, "not valid JSON"),
])
def test_bodies_that_are_not_a_json_object_are_400(fake_client, httpserver, data, words):
    response = fake_client.post(CHAT, data=data, content_type="application/json")
    error = assert_openai_envelope(response, 400)
    assert words in error["message"]
    assert httpserver.log == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_wrong_content_type_is_415(fake_client, httpserver, content_type):
    response = fake_client.post(CHAT, data=json.dumps({"messages": USER}), content_type=content_type)
    error = assert_openai_envelope(response, 415)
    assert "Content-Type must be application/json" in error["message"]
    assert httpserver.log == []


def test_json_with_charset_and_missing_content_type_are_accepted(fake_client, httpserver):
    httpserver.expect_request(CHAT, method="POST").respond_with_json({"object": "chat.completion"})
    body = json.dumps({"messages": USER})
    assert fake_client.post(CHAT, data=body, content_type="application/json; charset=utf-8").status_code == 200
    assert fake_client.post(CHAT, data=body, headers={"Content-Type": ""}).status_code == 200


def test_unknown_and_llama_fields_pass_through_byte_for_byte(fake_client, httpserver):
    # The gateway validates what it owns and forwards the client's own bytes, extra fields and all.
    raw = (b'{"model":"llama","messages":[{"role":"user","content":"hi","x_custom":1}],'
           b'"n_predict":-1,"cache_prompt":true,"top_k":5,"min_p":0.1,"grammar":"root ::= \\"a\\"",'
           b'"json_schema":{"type":"object"},"ignore_eos":false,"samplers":["top_k"],"temperature":null}')
    httpserver.expect_request(CHAT, method="POST", data=raw).respond_with_json({"object": "chat.completion"})
    response = fake_client.post(CHAT, data=raw, content_type="application/json")
    assert response.status_code == 200
    assert httpserver.log[0][0].get_data() == raw


@pytest.mark.parametrize("body", [
    # Roles are OpenAI's to extend (it added developer) and llama.cpp's template reads any word.
    {"messages": [{"role": "wizard", "content": "hi"}, {"role": "developer", "content": "be brief"}, *USER]},
    {"messages": [*USER, {"role": "system", "content": "mid-conversation"}, *USER]},
    {"messages": [*USER, tool_call_message({"id": "a", "type": "function", "function": {"name": "f", "arguments": {}}}),
                  {"role": "tool", "tool_call_id": "a", "content": "ok"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "input_audio", "x": 1}]}]},
    {"messages": [*USER, {"role": "assistant", "content": "x", "tool_calls": None}, *USER], "tools": []},
    {"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"},
                                                                  "strict": True}}], "tool_choice": "auto"},
    {"messages": USER, "reasoning_effort": "minimal", "verbosity": "low", "prompt_cache_key": "k", "store": False},
], ids=["any role word", "system mid-conversation", "a tool call and its result", "any content part type",
        "null tool_calls, no tools", "a function tool", "newer OpenAI fields"])
def test_what_llama_cpp_takes_reaches_it_unchanged(fake_client, httpserver, body):
    raw = json.dumps(body).encode()
    httpserver.expect_request(CHAT, method="POST", data=raw).respond_with_json({"object": "chat.completion"})
    response = fake_client.post(CHAT, data=raw, content_type="application/json")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert httpserver.log[0][0].get_data() == raw
