"""Talking to the gateway under test: the official SDKs' clients, request helpers, and checks of the error
envelopes that come back (OpenAI's on a Flask response, Anthropic's as the anthropic SDK raises it)."""
from datetime import datetime, timedelta, timezone

import anthropic
import openai

from tests.apps import DEFAULT_KEY, TEAM_KEY

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
ANTHROPIC_VERSION = {"anthropic-version": "2023-06-01"}
# llama.cpp's greedy sampling: the same tokens every run, and never the demo model's random early end of turn
# (the anthropic SDK has no temperature argument any more).
GREEDY = {"extra_body": {"temperature": 0}}


def chat(client, model="chat", **fields):
    """POST a chat request for model."""
    return client.post(CHAT, json={"model": model, "messages": HI, **fields})


def openai_sdk(base, path="/v1", key=TEAM_KEY) -> openai.OpenAI:
    """An openai client for the gateway at base, as a user would configure it (no retries: tests see every answer)."""
    return openai.OpenAI(base_url=base + path, api_key=key, max_retries=0, timeout=30)


def anthropic_sdk(base, key=DEFAULT_KEY, **options) -> anthropic.Anthropic:
    """An Anthropic client of the gateway, as a user points one at it (the base URL without /v1)."""
    return anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=30, **options)


def request_id_header(name) -> dict:
    """Headers that give a request a known id (to find its log line)."""
    return {"x-request-id": name}


def reset_in(header: str) -> float:
    """Seconds from now until an RFC 3339 reset time (Anthropic's format: 2026-01-01T12:00:00Z)."""
    moment = datetime.strptime(header, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return (moment - datetime.now(timezone.utc)) / timedelta(seconds=1)


def assert_openai_envelope(response, status):
    """The Flask response has status and OpenAI's error envelope, with a message; return its error object."""
    assert response.status_code == status
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["message"], str)
    return error


def assert_anthropic_envelope(error: anthropic.APIStatusError, kind: str, *words):
    """The anthropic SDK's APIStatusError found Anthropic's envelope, of type kind, its message naming words."""
    assert error.body["type"] == "error" and set(error.body) == {"type", "error"}, error.body
    assert error.body["error"]["type"] == kind and error.type == kind, error.body
    for word in words:
        assert word in error.body["error"]["message"], error.body
