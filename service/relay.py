"""Relay llama-server's answers to the client: whole JSON bodies as they came, SSE streams event by event.

Token usage is read from what passes through (for the token limit and the log line). The only request body the
gateway ever rewrites is a chat stream's, to ask for the usage chunk the client did not ask for (one member
spliced into the client's own bytes), and that chunk is then taken out again so that the client gets exactly the
stream it asked for. Where the gateway routes by model, the answers' "model" members are set to the name the
client sent. llama.cpp's report of a failure mid-stream ends the relayed stream, in the form OpenAI clients read.
"""
import json
import re
from dataclasses import dataclass

from flask import Response, current_app, g, request

from .disconnect import UpstreamCall
from .errors import ClientClosedRequest, ShuttingDown, UpstreamError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# A "model" member of a JSON object. Inside a JSON string every '"' is escaped, so this matches members only.
_MODEL_MEMBER = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')

# The blank line that ends an SSE event: llama.cpp writes "\n\n", and CRLF line ends are as valid.
_EVENT_END = re.compile(rb"(\r\n\r\n|\n\n)")  # captured: split keeps the blank lines

# JSON's whitespace, and no other.
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def get_upstream():
    """Return the app's Upstream (one per app, in app.extensions)."""
    return current_app.extensions["upstream"]


def send_watched(route, path: str, group: str, raw: bytes, stream: bool):
    """POST raw to a replica of route as an UpstreamCall that is cut if this request's client disconnects
    (where waitress can tell) or when the shutdown grace runs out; return (response, call). The call stays
    watched for a stream (its relay unwatches it) and is unwatched at once otherwise, or on any failure."""
    record, watch, upstream = g.record, current_app.extensions["disconnect_watch"], get_upstream()
    call = UpstreamCall()
    watch.watch(call, request.environ.get("waitress.client_disconnected"))
    headers = {"X-Request-Id": record.request_id}
    try:
        record.replica, response = route.send(
            lambda replica: upstream.request("POST", path, group=group, base_url=replica.url, body=raw,
                                             stream=stream, record=record, headers=headers, call=call), record)
    except BaseException:
        watch.unwatch(call)
        raise
    if not stream:
        watch.unwatch(call)
    return response, call


def proxy_json_post(path: str, group: str, raw: bytes, body: dict) -> Response:
    """POST the client's bytes to the model's llama-server and answer with its JSON body (unchanged, but for
    the model's name where the gateway routes by model)."""
    route = current_app.extensions["router"].route(body.get("model"))
    response, _ = send_watched(route, path, group, raw, stream=False)
    answer, parsed = get_upstream().read_json(response, path)
    g.record.add_usage(parsed.get("usage"))
    if route.name is not None:
        answer = rename_model(answer, model_member(route.name))
    return Response(answer, status=response.status_code, mimetype="application/json")


def model_member(name: str) -> bytes:
    """The "model" member that gives the client back the name it asked for."""
    return b'"model":' + json.dumps(name).encode()


def rename_model(data: bytes, member: bytes) -> bytes:
    """Put member in place of every "model" member in data (whatever the upstream calls its model file)."""
    return _MODEL_MEMBER.sub(member.replace(b"\\", b"\\\\"), data)


def proxy_generation(path: str, group: str, raw: bytes, body: dict) -> Response:
    """POST a chat or text completion; relay it as SSE when the client asked for a stream."""
    if body.get("stream") is not True:
        return proxy_json_post(path, group, raw, body)
    route = current_app.extensions["router"].route(body.get("model"))
    strip_usage = False
    # Text completion streams always end with usage; chat streams only when asked.
    if group == "chat" and not _asks_for_usage(body):
        asking = ask_for_usage(raw, body)
        if asking is not None:
            raw, strip_usage = asking, True
    response, call = send_watched(route, path, group, raw, stream=True)
    stream = Stream(get_upstream(), response, group, g.record, call, current_app.extensions["disconnect_watch"],
                    current_app.extensions["gateway_metrics"].open_streams, strip_usage,
                    None if route.name is None else model_member(route.name))
    stream.open_streams.inc()
    relayed = Response(relay_events(stream), status=200, mimetype="text/event-stream", headers=SSE_HEADERS)
    # Not the generator's finally: a generator that was never started does not run it when closed, and a
    # server may close the body without reading any of it. Registered before the policy's own close (the
    # log line and metrics), so that those see the stream ended.
    relayed.call_on_close(stream.close)
    return relayed


@dataclass
class Stream:
    """One relayed stream and everything its generator needs once the request context is gone."""

    upstream: object
    response: object
    group: str
    record: object
    call: UpstreamCall
    watch: object
    open_streams: object
    strip_usage: bool
    model: bytes = None  # the "model" member every event gets, where the gateway routes by model

    def close(self):
        """Let go of the upstream call (the response calls this once, when the server closes it): when the
        client went away, llama.cpp sees its connection close and stops generating."""
        try:
            self.watch.unwatch(self.call)
            self.open_streams.dec()
        finally:
            self.response.close()


def _asks_for_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def ask_for_usage(raw: bytes, body: dict):
    """The client's body asking llama.cpp for a chat stream's usage chunk, or None for a body not in UTF-8.

    The flag is spliced into the client's own bytes, so nothing else is re-encoded: a lone surrogate escape or
    a 1e999 reaches llama.cpp as the client wrote it, and llama.cpp judges it. It goes last, and llama.cpp's
    JSON parser (nlohmann's), like Python's, keeps the last of duplicate keys.
    """
    if json.detect_encoding(raw) not in ("utf-8", "utf-8-sig"):
        return None  # not JSON as RFC 8259 sends it; forwarded as it came
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


def relay_events(stream: Stream):
    """Yield whole SSE events as soon as each arrives; end with an error event if the upstream breaks or
    reports a failure.

    Whole events only, so that an error event never lands in the middle of a half-sent one. The upstream
    response is closed by stream.close, which the response calls when the server closes it: when the client
    goes away, waitress closes the response (or the disconnect watch cuts the call).
    """
    record = stream.record
    pending = b""
    try:
        for data in stream.upstream.iter_stream(stream.response, stream.group, stream.call):
            pending += data
            cut = _end_of_last_event(pending)
            if cut:
                events, pending = pending[:cut], pending[cut:]
                events, error = _edit(events, stream)
                if error is not None:
                    record.error, record.upstream_error = error.code, error.kind
                if events:
                    if record.ttft_ms is None:
                        record.ttft_ms = record.elapsed_ms()
                    yield events
                if error is not None:
                    return
        if pending:
            events, error = _edit(pending, stream)
            if error is not None:
                record.error, record.upstream_error = error.code, error.kind
            if events:
                yield events
    except ClientClosedRequest as gone:
        record.error = gone.code  # nobody is left to tell
    except ShuttingDown as stopping:
        record.error = stopping.code
        yield sse_error_event(stopping)
    except UpstreamError as error:
        record.error, record.upstream_error = error.code, error.kind
        yield sse_error_event(error)


def _edit(events: bytes, stream: Stream) -> tuple:
    """Return (what to send of these events, llama.cpp's error if one of them reports one)."""
    error = None
    # Cheap tests first: most events are content chunks that need no parsing.
    if b'"usage"' in events or b"error" in events:
        events, error = _read_events(events, stream.record, stream.strip_usage)
    if stream.model is not None:
        events = rename_model(events, stream.model)
    return events, error


def _read_events(events: bytes, record, strip_usage: bool) -> tuple:
    """Record the usage these events carry, drop the usage-only chunk the gateway asked for on its own, and stop
    at llama.cpp's report of a failure; return (what to send, the error reported or None)."""
    kept = []
    for event, end in _split_events(events):
        if b"error" in event:
            reported = upstream_error_event(event + end)
            if reported is not None:
                kept.append(reported[0])
                return b"".join(kept), reported[1]  # nothing after it (llama.cpp may still send [DONE])
        if b'"usage"' in event:
            chunk = _data_json(event)
            if isinstance(chunk, dict):
                record.add_usage(chunk.get("usage"))
                if strip_usage and chunk.get("choices") == []:
                    continue
        kept.append(event + end)
    return b"".join(kept), None


def upstream_error_event(event: bytes):
    """If event is llama.cpp's report of a failure mid-stream, return (the event to send the client, the
    UpstreamError to record); else None. This is OpenAI's form: each API family will have its own.

    Later llama.cpp builds send it as OpenAI does, a data event with an "error" member, which passes as it came.
    Earlier builds send an "error:" field (then [DONE]); OpenAI clients read data fields only, so the stream
    would seem to end well: that one becomes the gateway's own error event, with llama.cpp's message.
    """
    fields = _field_values(event, b"error")
    if fields:
        error = _reported_error(_loads(b"\n".join(fields)))
        return sse_error_event(error), error
    if b'"error"' in event:
        chunk = _data_json(event)
        if isinstance(chunk, dict) and "error" in chunk:
            return event, _reported_error(chunk["error"])
    return None


def _reported_error(reported) -> UpstreamError:
    """The gateway's error for llama.cpp's error object: its message is passed on, anything else only described."""
    if isinstance(reported, dict) and isinstance(reported.get("message"), str):
        message = reported["message"]
    elif isinstance(reported, str):
        message = reported
    else:
        message = "an error report that is not an error object"
    status = reported.get("code") if isinstance(reported, dict) else None
    return UpstreamError(f"llama-server failed mid-stream: {message}", kind="5xx",
                         upstream_status=status if type(status) is int else None)


def _split_events(data: bytes):
    """(event, the blank line that ends it) for each event in data; a last one without a blank line gets b""."""
    parts = _EVENT_END.split(data) + [b""]
    return zip(parts[0::2], parts[1::2])


def _field_values(event: bytes, name: bytes) -> list:
    """The values of the event's name fields, read as the SSE spec says ("data:x" and "data: x" are both x)."""
    values = []
    for line in event.splitlines():
        field, colon, value = line.partition(b":")
        if colon and field == name:
            values.append(value[1:] if value[:1] == b" " else value)
    return values


def _data_json(event: bytes):
    """The JSON value of the event's data, or None."""
    data = _field_values(event, b"data")
    return _loads(b"\n".join(data)) if data else None


def _loads(data: bytes):
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _end_of_last_event(buffer: bytes) -> int:
    """Index just past the last complete SSE event (a blank line: "\\n\\n", or "\\r\\n\\r\\n"), 0 if none."""
    lf = buffer.rfind(b"\n\n")
    crlf = buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def sse_error_event(error) -> bytes:
    """An OpenAI-style error event, which the openai SDK raises as an APIError."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"
