"""The four API families the gateway speaks, each described once."""
import json
from datetime import datetime, timedelta, timezone
from typing import Callable

from .anthropic_events import AnthropicEvents
from .family import Family, Usage
from .responses_events import ResponsesEvents

# OpenAI's error type for a status; others fall back by class.
OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                      429: "rate_limit_error", 501: "not_supported_error", 502: "upstream_error",
                      503: "unavailable_error", 504: "timeout_error",
                      "4xx": "invalid_request_error", "5xx": "server_error"}

# Anthropic's error types by status (docs.anthropic.com, errors); 529 is its "overloaded".
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 504: "timeout_error", 529: "overloaded_error",
                         "4xx": "invalid_request_error", "5xx": "api_error"}


def duration(seconds: float) -> str:
    """OpenAI's (Go's) duration format: 20ms, 1s, 1.5s, 6m0s."""
    milliseconds = max(0, round(seconds * 1000))
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    minutes, rest = divmod(milliseconds, 60000)
    rest = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def rfc3339_after(seconds: float) -> str:
    """The UTC time seconds from now, as Anthropic writes its reset times: 2026-01-01T12:00:00Z."""
    moment = datetime.now(timezone.utc) + timedelta(seconds=max(0.0, seconds))
    if moment.microsecond:  # rounded up: a reset said too early would send the client back too soon
        moment += timedelta(microseconds=1_000_000 - moment.microsecond)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _rate_headers(name: str, reset) -> Callable:
    """A family's rate-limit headers: name (with {kind} limit/remaining/reset and {unit} requests/tokens) for
    each limit that is on, the reset written by reset(seconds)."""

    def headers(state) -> dict:
        shown = {}
        for unit, limit, used, reset_s in (("requests", state.limits.rpm, state.requests, state.requests_reset_s),
                                           ("tokens", state.limits.tpm, state.tokens, state.tokens_reset_s)):
            if limit:
                shown[name.format(kind="limit", unit=unit)] = str(limit)
                shown[name.format(kind="remaining", unit=unit)] = str(max(0, limit - used))
                shown[name.format(kind="reset", unit=unit)] = reset(max(0.0, reset_s))
        return shown

    return headers


openai_rate_headers = _rate_headers("x-ratelimit-{kind}-{unit}", duration)
anthropic_rate_headers = _rate_headers("anthropic-ratelimit-{unit}-{kind}", rfc3339_after)


def openai_envelope(type, message, param, code) -> dict:
    """{"error": {"message", "type", "param", "code"}}: OpenAI's, which llama.cpp's own errors also follow."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def anthropic_envelope(type, message, param, code) -> dict:
    """{"type": "error", "error": {"type", "message"}}: Anthropic's (it has no param or code)."""
    return {"type": "error", "error": {"type": type, "message": message}}


def data_event(body: dict) -> bytes:
    """An error as a data-only event, which the openai SDK raises as an APIError."""
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def error_event(body: dict) -> bytes:
    """An error as an `event: error` event, as Anthropic's API (and its SDK) has it."""
    return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"


OPENAI_USAGE = Usage(paths=(("usage",),), prompt=("prompt_tokens",), completion=("completion_tokens",))

OPENAI = Family("openai", openai_envelope, OPENAI_ERROR_TYPES, data_event, openai_rate_headers, OPENAI_USAGE)

# The Responses API: OpenAI's envelope; usage in the answer, or in response.completed's response in a stream.
# Its stream's error event is its editor's (ResponsesEvents.error_event: `event: error`, with a sequence number).
RESPONSES = Family("openai-responses", openai_envelope, OPENAI_ERROR_TYPES, data_event, openai_rate_headers,
                   Usage(paths=(("usage",), ("response", "usage")), prompt=("input_tokens",),
                         completion=("output_tokens",)),
                   events=ResponsesEvents)

# Anthropic's Messages API: its own envelope, types and headers; llama.cpp reports the cached part of the
# prompt as cache_read_input_tokens, so the prompt is the sum (usage in message_start, then message_delta).
ANTHROPIC = Family("anthropic", anthropic_envelope, ANTHROPIC_ERROR_TYPES, error_event, anthropic_rate_headers,
                   Usage(paths=(("usage",), ("message", "usage")),
                         prompt=("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"),
                         completion=("output_tokens",)),
                   request_id_headers=("x-request-id", "request-id"),
                   statuses={503: 529, "upstream_unavailable": 529, "server_shutting_down": 529},
                   keeps_upstream_types=False, events=AnthropicEvents)

# llama.cpp's own endpoints (rerank, tokenize, infill, ...): OpenAI-style errors, as llama.cpp answers them;
# /infill reports its use as tokens_evaluated and tokens_predicted, rerank as a usage object.
LLAMA = Family("llama.cpp", openai_envelope, OPENAI_ERROR_TYPES, data_event, openai_rate_headers,
               Usage(paths=(("usage",), ()), prompt=("prompt_tokens", "tokens_evaluated"),
                     completion=("completion_tokens", "tokens_predicted"),
                     markers=(b'"usage"', b'"stop":true')))  # an infill stream's counts come in its last chunk
