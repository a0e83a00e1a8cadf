"""Anthropic's Messages stream events, completed where llama.cpp leaves message_start out.

llama.cpp sends message_start only with the text of a stream's first token; a first token it holds back (half a
UTF-8 character, as an emoji or a CJK character is in byte-fallback vocabularies) leaves the stream without one.
The anthropic SDK's messages.stream() then builds no message (get_final_message() fails), and the prompt's tokens,
which only message_start reports, go uncounted. The editor puts the missing message_start before the stream's
first event, with the input tokens llama.cpp's own count_tokens finds in the client's body.
"""
import json
import uuid

from ..proxy import sse
from .family import PlainEvents

COUNT_TOKENS = "/v1/messages/count_tokens"


class AnthropicEvents(PlainEvents):
    """The editor of one Messages stream: it makes sure the stream opens with message_start."""

    def __init__(self, family, request=None):
        super().__init__(family, request)
        self.opened = False

    @property
    def edits(self) -> bool:
        """Only until the stream has opened: after that its events pass untouched (and unparsed)."""
        return not self.opened

    def edit(self, event: bytes) -> bytes:
        """Return event, after a message_start of the gateway's own if it opens a stream that has none."""
        if self.opened:
            return event
        payload = sse.data_json(event)
        if payload is None:
            return event  # a comment (a ping), not the stream's first event
        self.opened = True
        if isinstance(payload, dict) and payload.get("type") == "message_start":
            return event
        return self._message_start() + b"\n\n" + event

    def _message_start(self) -> bytes:
        message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "content": [],
                   "model": self.request.model if self.request else None, "stop_reason": None,
                   "stop_sequence": None, "usage": {"input_tokens": self._input_tokens(), "output_tokens": 0}}
        return b"event: message_start\ndata: " + json.dumps({"type": "message_start", "message": message}).encode()

    def _input_tokens(self) -> int:
        # A failed count must not end a stream that works: the prompt then goes uncounted, as llama.cpp left it.
        counted = self.request.ask(COUNT_TOKENS) if self.request else None
        tokens = counted.get("input_tokens") if isinstance(counted, dict) else None
        return tokens if type(tokens) is int else 0
