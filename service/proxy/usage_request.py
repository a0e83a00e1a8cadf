"""Asking llama.cpp for a chat stream's usage chunk when the client did not: one member spliced into the
client's own bytes, so that nothing the gateway does not own is re-encoded."""
import json
import re

# JSON's whitespace, and no other.
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def asks_for_usage(body: dict) -> bool:
    """True when the client's chat stream body asks for the usage chunk itself."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def ask_for_usage(raw: bytes, body: dict):
    """The client's body (UTF-8, as read_json_body checked) asking llama.cpp for a chat stream's usage chunk.

    The flag is spliced into the client's own bytes, so nothing else is re-encoded: a lone surrogate escape or
    a 1e999 reaches llama.cpp as the client wrote it, and llama.cpp judges it. It goes last, and llama.cpp's
    JSON parser (nlohmann's), like Python's, keeps the last of duplicate keys.
    """
    options = body.get("stream_options")
    if isinstance(options, dict) and options.keys() - {"include_usage"}:
        # The client's other stream options stay as it wrote them: the flag goes last into its own object.
        text = raw.decode("utf-8")
        _, end = _member_span(text, "stream_options")
        return (text[:end - 1] + ',"include_usage":true' + text[end - 1:]).encode("utf-8")
    # Any stream_options the client sent is an empty object, null or include_usage alone: a new one replaces it.
    # The body is never {}: it says "stream": true.
    end = len(raw.rstrip(b" \t\n\r")) - 1  # the object's closing brace
    return raw[:end] + b',"stream_options":{"include_usage":true}' + raw[end:]


def _member_span(text: str, name: str) -> tuple:
    """Where the value of the JSON object text's member name starts and ends (the last one, as parsers keep)."""
    decoder, span = json.JSONDecoder(), None
    at = _JSON_SPACE.match(text, 1 if text.startswith("\ufeff") else 0).end() + 1  # past the "{"
    at = _JSON_SPACE.match(text, at).end()
    while text[at] != "}":
        key, at = json.decoder.scanstring(text, at + 1)
        start = _JSON_SPACE.match(text, _JSON_SPACE.match(text, at).end() + 1).end()  # past the ":"
        end = decoder.raw_decode(text, start)[1]
        if key == name:
            span = (start, end)
        at = _JSON_SPACE.match(text, end).end()
        if text[at] == ",":
            at = _JSON_SPACE.match(text, at + 1).end()
    return span
