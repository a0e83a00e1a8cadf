"""The Responses API's stream events, completed where llama.cpp leaves fields out.

llama.cpp's Responses events carry no sequence_number, output_index or content_index; the openai SDK's
responses.stream() helper needs them (it raises a TypeError without). Each event gets those it lacks, spliced
into its JSON as the first members; nothing else in it is touched.
"""
import json

from .family import PlainEvents

# Events that belong to one output item (they get its output_index), and those of one content part of it.
_ITEM_EVENTS = ("response.output_item.", "response.content_part.", "response.output_text.", "response.refusal.",
                "response.function_call_arguments.", "response.reasoning_text.", "response.reasoning_summary")
_PART_EVENTS = ("response.content_part.", "response.output_text.", "response.refusal.", "response.reasoning_text.")


class ResponsesEvents(PlainEvents):
    """The editor of one Responses stream: counts its events, its output items and their content parts."""

    edits = True

    def __init__(self, family, request=None):
        super().__init__(family, request)
        self.sequence = 0
        self.items = {}  # item id -> output index
        self.parts = {}  # output index -> index of its latest content part

    def edit(self, event: bytes) -> bytes:
        """Return event with the sequence number and indexes it lacks (an event of one data line; others, which
        llama.cpp does not send, pass as they came)."""
        lines = event.split(b"\n")
        data_lines = [index for index, line in enumerate(lines) if line.startswith(b"data:")]
        if len(data_lines) != 1:
            return event
        at = data_lines[0]
        value, cr = lines[at][len(b"data:"):], lines[at].endswith(b"\r")
        try:
            payload = json.loads(value)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return event
        added = {}
        if "sequence_number" not in payload:
            added["sequence_number"] = self.sequence
        self.sequence += 1
        kind = payload.get("type")
        if isinstance(kind, str) and kind.startswith(_ITEM_EVENTS):
            self._indexes(kind, payload, added)
        if not added:
            return event
        body = value.strip()  # "{...}"
        members = json.dumps(added)[1:-1].encode()
        lines[at] = b"data: {" + members + (b"," if body[1:].lstrip()[:1] != b"}" else b"") + body[1:] \
            + (b"\r" if cr else b"")
        return b"\n".join(lines)

    def _indexes(self, kind, payload, added):
        item = payload.get("item") if isinstance(payload.get("item"), dict) else {}
        item_id = payload.get("item_id") or item.get("id")
        item_id = item_id if isinstance(item_id, str) else None
        if kind == "response.output_item.added" and item_id not in self.items:
            self.items[item_id] = len(self.items)
        index = self.items.get(item_id, max(len(self.items) - 1, 0))
        if "output_index" not in payload:
            added["output_index"] = index
        if kind.startswith(_PART_EVENTS):
            if kind == "response.content_part.added":
                self.parts[index] = self.parts.get(index, -1) + 1
            if "content_index" not in payload:
                added["content_index"] = max(self.parts.get(index, 0), 0)

    def error_event(self, status: int, message: str, **fields) -> bytes:
        """The Responses API's error event: {"type": "error", "code", "message", "param", "sequence_number"}."""
        error = self.family.error_body(status, message, **fields)["error"]
        body = {"type": "error", "code": error["code"] or error["type"], "message": error["message"],
                "param": error["param"], "sequence_number": self.sequence}
        self.sequence += 1
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
