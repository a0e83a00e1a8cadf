"""What the coding agents send (Claude Code 2.1 and Codex CLI 0.171, shapes captured from their requests) passes
validation, reaches llama.cpp byte for byte, and streams back."""
import json

import pytest
import requests
from werkzeug import Response

from tests.apps import DEFAULT_KEY, DEFAULT_KEY_LIMITS

# The 24 tools Claude Code 2.1.197 sent with `claude -p "say hi"`.
CLAUDE_CODE_TOOLS = ("Agent", "Bash", "CronCreate", "CronDelete", "CronList", "Edit", "EnterWorktree", "ExitWorktree",
                     "NotebookEdit", "Read", "ReportFindings", "ScheduleWakeup", "SendMessage", "Skill", "TaskCreate",
                     "TaskGet", "TaskList", "TaskOutput", "TaskStop", "TaskUpdate", "WebFetch", "WebSearch", "Workflow",
                     "Write")
# Its headers: the betas it asks for (mid-conversation-system puts a system message inside messages).
CLAUDE_CODE_HEADERS = {
    "Authorization": f"Bearer {DEFAULT_KEY}", "anthropic-version": "2023-06-01", "Content-Type": "application/json",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,thinking-token-count-2026-05-13,"
                      "context-management-2025-06-27,prompt-caching-scope-2026-01-05,"
                      "mid-conversation-system-2026-04-07,effort-2025-11-24"}
CODEX_HEADERS = {"Authorization": f"Bearer {DEFAULT_KEY}", "Content-Type": "application/json",
                 "accept": "text/event-stream", "originator": "codex_exec"}


def claude_code_tool(name):
    """One of Claude Code's tools, its text shortened: a JSON Schema 2020-12 input schema, with an enum."""
    return {"name": name, "description": f"{name}.", "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
        "properties": {"x": {"type": "string", "enum": ["a", "b"]}}, "required": ["x"], "additionalProperties": False}}


def claude_code_body(tools=CLAUDE_CODE_TOOLS):
    """Claude Code 2.1's POST /v1/messages, its texts shortened (the real one is 75 KB, ~11k tokens)."""
    return {"model": "claude-sonnet-4-6", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "<system-reminder>Be kind.</system-reminder>"},
                                     {"type": "text", "text": "say hi", "cache_control": {"type": "ephemeral"}}]},
        {"role": "system", "content": "Available agent types for the Agent tool: claude."}],
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197; cc_entrypoint=sdk-cli;"},
                   {"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral"}}],
        "tools": [claude_code_tool(name) for name in tools],
        "metadata": {"user_id": json.dumps({"device_id": "d1", "account_uuid": "", "session_id": "s1"})},
        "max_tokens": 32000, "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"}, "stream": True}


def claude_code_count_body():
    """The same conversation, as /v1/messages/count_tokens takes it."""
    body = claude_code_body()
    for name in ("max_tokens", "stream", "metadata", "context_management", "output_config"):
        del body[name]
    return body


def codex_message(role, text):
    """An input item as Codex sends it: a message with an id, its text as input_text parts."""
    return {"type": "message", "id": f"msg_{role}_{len(text)}", "role": role,
            "content": [{"type": "input_text", "text": text}]}


def codex_body():
    """Codex CLI 0.171's POST /v1/responses (`codex exec`), its texts shortened (the real one is 40 KB)."""
    function = {"type": "function", "name": "exec_command", "description": "Runs a command.", "strict": False,
                "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"],
                               "additionalProperties": False}}
    return {"model": "llama", "stream": True, "instructions": "You are a coding agent running in the Codex CLI.",
            "input": [codex_message("developer", "<permissions instructions>read-only</permissions instructions>"),
                      codex_message("user", "<environment_context><cwd>/w</cwd></environment_context>"),
                      codex_message("user", "say hi")],
            "tools": [function, {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
                                 "tools": [{**function, "name": "close_agent"}]},
                      {"type": "web_search", "external_web_access": False}],
            "tool_choice": "auto", "parallel_tool_calls": True, "reasoning": {"summary": "auto"}, "store": False,
            "include": ["reasoning.encrypted_content"], "prompt_cache_key": "01a24fbb",
            "client_metadata": {"session_id": "01a24fbb", "turn_id": "01a24fbc"}}


ANTHROPIC_STREAM = b"".join(
    b"event: %s\ndata: %s\n\n" % (event["type"].encode(), json.dumps(event).encode()) for event in (
        {"type": "message_start", "message": {"id": "m1", "type": "message", "role": "assistant", "content": [],
                                              "model": "demo", "usage": {"input_tokens": 9, "output_tokens": 0}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}},
        {"type": "message_stop"}))
RESPONSES_STREAM = b"".join(
    b"event: %s\ndata: %s\n\n" % (event["type"].encode(), json.dumps(event).encode()) for event in (
        {"type": "response.created", "response": {"id": "resp_1", "object": "response", "status": "in_progress"}},
        {"type": "response.completed", "response": {
            "id": "resp_1", "object": "response", "status": "completed", "model": "m", "output": [],
            "usage": {"input_tokens": 9, "output_tokens": 1, "total_tokens": 10}}}))


@pytest.fixture
def fake_gateway(make_app, live_gateway, httpserver):
    """The base URL of a keyed gateway in front of pytest-httpserver."""
    return live_gateway(make_app(httpserver.url_for("").rstrip("/"), **DEFAULT_KEY_LIMITS))


@pytest.mark.parametrize("path, body, answer", [
    ("/v1/messages", claude_code_body(), ANTHROPIC_STREAM),
    ("/v1/messages/count_tokens", claude_code_count_body(), b'{"input_tokens": 9}'),
], ids=["messages", "count_tokens"])
def test_claude_codes_request_reaches_llama_cpp_byte_for_byte(fake_gateway, httpserver, path, body, answer):
    raw = json.dumps(body).encode()
    kind = "text/event-stream" if body.get("stream") else "application/json"
    httpserver.expect_request(path, method="POST", data=raw).respond_with_handler(
        lambda request: Response(answer, content_type=kind))
    # Claude Code adds ?beta=true to the URL; llama.cpp is sent the path alone.
    reply = requests.post(f"{fake_gateway}{path}?beta=true", data=raw, headers=CLAUDE_CODE_HEADERS, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["Content-Type"].startswith(kind) and reply.content == answer
    assert httpserver.log[0][0].get_data() == raw


def test_codexs_request_reaches_llama_cpp_byte_for_byte(fake_gateway, httpserver):
    raw = json.dumps(codex_body()).encode()
    httpserver.expect_request("/v1/responses", method="POST", data=raw).respond_with_handler(
        lambda request: Response(RESPONSES_STREAM, content_type="text/event-stream"))
    reply = requests.post(fake_gateway + "/v1/responses", data=raw, headers=CODEX_HEADERS, timeout=30)
    assert reply.status_code == 200, reply.text
    assert b"event: response.completed" in reply.content
    assert httpserver.log[0][0].get_data() == raw


@pytest.mark.llama
def test_claude_codes_request_streams_from_the_real_llama_cpp(make_app, live_gateway, llama):
    base = live_gateway(make_app(llama.url, **DEFAULT_KEY_LIMITS))
    body = {**claude_code_body(), "max_tokens": 3}  # its 32000 would run the random model to the end of its context
    reply = requests.post(base + "/v1/messages?beta=true", json=body, headers=CLAUDE_CODE_HEADERS, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    assert reply.content.startswith(b"event: message_start") and reply.content.endswith(b'"message_stop"}\n\n')
    counted = requests.post(base + "/v1/messages/count_tokens?beta=true", json=claude_code_count_body(),
                            headers=CLAUDE_CODE_HEADERS, timeout=30)
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0


@pytest.mark.llama
def test_codexs_request_streams_from_the_real_llama_cpp(make_app, live_gateway, llama):
    base = live_gateway(make_app(llama.url, **DEFAULT_KEY_LIMITS))
    body = {**codex_body(), "max_output_tokens": 3}
    reply = requests.post(base + "/v1/responses", json=body, headers=CODEX_HEADERS, timeout=60)
    assert reply.status_code == 200, reply.text
    assert b"event: response.completed" in reply.content

