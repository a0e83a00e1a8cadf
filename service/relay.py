"""Relay llama-server's answers to the client: whole JSON bodies as they came, SSE streams event by event.

Token usage is read from what passes through (for the token limit and the log line). The only request body the
gateway ever rewrites is a chat stream's, to ask for the usage chunk the client did not ask for, and that chunk
is then taken out again so that the client gets exactly the stream it asked for. Where the gateway routes by
model, the answers' "model" members are set to the name the client sent; nothing else in them is touched.
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
    # Text completion streams always end with usage; chat streams only when asked.
    strip_usage = group == "chat" and not _asks_for_usage(body)
    if strip_usage:
        raw = json.dumps({**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}},
                         ensure_ascii=False).encode()
    response, call = send_watched(route, path, group, raw, stream=True)
    stream = Stream(get_upstream(), response, group, g.record, call, current_app.extensions["disconnect_watch"],
                    current_app.extensions["gateway_metrics"].open_streams, strip_usage,
                    None if route.name is None else model_member(route.name))
    return Response(relay_events(stream), status=200, mimetype="text/event-stream", headers=SSE_HEADERS)


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


def _asks_for_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def relay_events(stream: Stream):
    """Yield whole SSE events as soon as each arrives; end with an error event if the upstream breaks.

    Whole events only, so that an error event never lands in the middle of a half-sent one. The upstream
    response is closed in finally: when the client goes away, waitress closes this generator (or the
    disconnect watch cuts the call) and llama.cpp sees its connection close and stops generating.
    """
    record = stream.record
    pending = b""
    stream.open_streams.inc()
    try:
        for data in stream.upstream.iter_stream(stream.response, stream.group, stream.call):
            pending += data
            cut = _end_of_last_event(pending)
            if cut:
                events, pending = pending[:cut], pending[cut:]
                if b'"usage"' in events:
                    events = _take_usage(events, record, stream.strip_usage)
                if stream.model is not None:
                    events = rename_model(events, stream.model)
                if events:
                    if record.ttft_ms is None:
                        record.ttft_ms = record.elapsed_ms()
                    yield events
        if pending:
            yield pending if stream.model is None else rename_model(pending, stream.model)
    except ClientClosedRequest as gone:
        record.error = gone.code  # nobody is left to tell
    except ShuttingDown as stopping:
        record.error = stopping.code
        yield sse_error_event(stopping)
    except UpstreamError as error:
        record.error, record.upstream_error = error.code, error.kind
        yield sse_error_event(error)
    finally:
        stream.watch.unwatch(stream.call)
        stream.open_streams.dec()
        stream.response.close()


def _take_usage(events: bytes, record, strip_usage: bool) -> bytes:
    """Record the usage these events carry; drop the usage-only chunk the gateway asked for on its own."""
    kept = []
    for event in events.split(b"\n\n"):
        if b'"usage"' in event and event.startswith(b"data: "):
            try:
                chunk = json.loads(event[len(b"data: "):])
            except ValueError:
                chunk = None
            if isinstance(chunk, dict):
                record.add_usage(chunk.get("usage"))
                if strip_usage and chunk.get("choices") == []:
                    continue
        kept.append(event)
    return b"\n\n".join(kept)


def _end_of_last_event(buffer: bytes) -> int:
    """Index just past the last complete SSE event (a blank line: "\\n\\n", or "\\r\\n\\r\\n"), 0 if none."""
    lf = buffer.rfind(b"\n\n")
    crlf = buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def sse_error_event(error) -> bytes:
    """An OpenAI-style error event, which the openai SDK raises as an APIError."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"
