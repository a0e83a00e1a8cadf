"""Reading server-sent events as the SSE spec frames them, without parsing more than needed."""
import json
import re

# The blank line that ends an SSE event: llama.cpp writes "\n\n", and CRLF line ends are as valid.
_EVENT_END = re.compile(rb"(\r\n\r\n|\n\n)")  # captured: split keeps the blank lines


def split_events(data: bytes):
    """(event, the blank line that ends it) for each event in data; a last one without a blank line gets b""."""
    parts = _EVENT_END.split(data) + [b""]
    return zip(parts[0::2], parts[1::2])


def field_values(event: bytes, name: bytes) -> list:
    """The values of the event's name fields, read as the SSE spec says ("data:x" and "data: x" are both x)."""
    values = []
    for line in event.splitlines():
        field, colon, value = line.partition(b":")
        if colon and field == name:
            values.append(value[1:] if value[:1] == b" " else value)
    return values


def data_json(event: bytes):
    """The JSON value of the event's data, or None."""
    data = field_values(event, b"data")
    return loads(b"\n".join(data)) if data else None


def loads(data: bytes):
    """The JSON value of data, or None if it is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def end_of_last_event(buffer: bytes) -> int:
    """Index just past the last complete SSE event (a blank line: "\\n\\n", or "\\r\\n\\r\\n"), 0 if none."""
    lf = buffer.rfind(b"\n\n")
    crlf = buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
