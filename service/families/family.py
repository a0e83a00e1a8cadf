"""The shape of an API family: its usage fields, its stream editor, its errors and headers."""
import json
from dataclasses import dataclass, field
from typing import Callable, Mapping


@dataclass(frozen=True)
class RateState:
    """A client's standing against its limits, whatever headers a family shows it in."""

    limits: object  # limits.Limits: rpm, tpm, concurrent (0 = off)
    requests: int  # requests in the window, this one included
    requests_reset_s: float  # until the oldest of them leaves the window
    tokens: int  # tokens in the window
    tokens_reset_s: float  # until the oldest of them leaves the window


@dataclass(frozen=True)
class Usage:
    """Where a family's answers report token use, and which counters make up prompt and completion tokens."""

    paths: tuple  # key paths to a usage object in an answer or a stream event
    prompt: tuple  # counters summed into prompt tokens (Anthropic splits cached input off)
    completion: tuple
    markers: tuple = (b'"usage"',)  # bytes an event must hold to be worth parsing

    def read(self, answer) -> tuple:
        """(prompt tokens, completion tokens) from a parsed answer or event; None for what it does not say."""
        for path in self.paths:
            usage = answer
            for key in path:
                usage = usage.get(key) if isinstance(usage, dict) else None
            if isinstance(usage, dict):
                return _sum(usage, self.prompt), _sum(usage, self.completion)
        return None, None

    def marked(self, data: bytes) -> bool:
        """True when data may report usage (a cheap test before parsing it; it runs on every stream chunk)."""
        for marker in self.markers:
            if marker in data:
                return True
        return False


def _sum(usage: dict, counters: tuple):
    counts = [usage[name] for name in counters
              if isinstance(usage.get(name), int) and not isinstance(usage.get(name), bool)]
    return sum(counts) if counts else None


@dataclass(frozen=True)
class StreamRequest:
    """What a stream's editor may know of the request it relays."""

    model: object  # the model the client asked for
    ask: Callable  # path -> llama.cpp's parsed answer to the client's body POSTed there (on the stream's replica)


class PlainEvents:
    """A stream whose events pass as they come; its error event is the family's."""

    edits = False

    def __init__(self, family, request: StreamRequest = None):
        self.family = family
        self.request = request

    def edit(self, event: bytes) -> bytes:
        """Return event unchanged."""
        return event

    def error_event(self, status: int, message: str, **fields) -> bytes:
        """The event that ends a broken stream, in the family's envelope."""
        return self.family.stream_error(self.family.error_body(status, message, **fields))


@dataclass(frozen=True)
class Family:
    """One API family: the data that makes the gateway answer as that API does."""

    name: str
    envelope: Callable  # (type, message, param, code) -> the error body
    error_types: Mapping  # status -> the family's error type
    stream_error: Callable  # error body -> the SSE event that ends a broken stream
    rate_headers: Callable  # RateState -> headers
    usage: Usage
    request_id_headers: tuple = ("x-request-id",)
    statuses: Mapping = field(default_factory=dict)  # a status or an error code -> the status this family shows
    keeps_upstream_types: bool = True  # pass llama.cpp's own error types on (they are OpenAI-style)
    events: Callable = PlainEvents  # (family, StreamRequest) -> the per-stream editor of its events

    def status(self, status: int, code: str = None) -> int:
        """The status this family answers an error with (Anthropic says 529 where the server is overloaded)."""
        return self.statuses.get(code) or self.statuses.get(status) or status

    def error_type(self, status: int) -> str:
        """The family's error type for a status it answers with."""
        return self.error_types.get(status) or self.error_types["4xx" if status < 500 else "5xx"]

    def error_body(self, status: int, message: str, *, type: str = None, param: str = None, code: str = None) -> dict:
        """The family's error envelope; the only place a family's error shape is written."""
        shown = self.status(status, code)
        kind = type if type and self.keeps_upstream_types else self.error_type(shown)
        return self.envelope(kind, message, param, code)

    def error_json(self, status: int, message: str, **fields) -> str:
        """The error envelope as JSON text."""
        return json.dumps(self.error_body(status, message, **fields))
