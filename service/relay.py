"""Relay llama-server's answers to the client: whole JSON bodies as they came, SSE streams event by event."""
import json

from flask import Response, current_app

from .errors import UpstreamError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}



def get_upstream():
    """Return the app's Upstream (one per app, in app.extensions)."""
    return current_app.extensions["upstream"]


def proxy_json_post(path: str, group: str, raw: bytes) -> Response:
    """POST the client's bytes to llama-server and answer with its JSON body, unchanged."""
    upstream = get_upstream()
    response = upstream.request("POST", path, group=group, body=raw)
    return Response(upstream.read_json(response, path), status=response.status_code, mimetype="application/json")


def proxy_generation(path: str, group: str, raw: bytes, body: dict) -> Response:
    """POST a chat or text completion; relay it as SSE when the client asked for a stream."""
    if body.get("stream") is not True:
        return proxy_json_post(path, group, raw)
    upstream = get_upstream()
    response = upstream.request("POST", path, group=group, body=raw, stream=True)
    return Response(relay_events(upstream, response, group), status=200, mimetype="text/event-stream",
                    headers=SSE_HEADERS)


def relay_events(upstream, response, group):
    """Yield whole SSE events as soon as each arrives; end with an error event if the upstream breaks.

    Whole events only, so that an error event never lands in the middle of a half-sent one. The upstream
    response is closed in finally: when the client goes away, waitress closes this generator and llama.cpp
    sees its connection close and stops generating.
    """
    pending = b""
    try:
        for data in upstream.iter_stream(response, group):
            pending += data
            cut = _end_of_last_event(pending)
            if cut:
                yield pending[:cut]
                pending = pending[cut:]
        if pending:
            yield pending
    except UpstreamError as error:
        yield sse_error_event(error)
    finally:
        response.close()


def _end_of_last_event(buffer: bytes) -> int:
    """Index just past the last complete SSE event (a blank line: "\n\n", or "\r\n\r\n"), 0 if none."""
    lf = buffer.rfind(b"\n\n")
    crlf = buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def sse_error_event(error: UpstreamError) -> bytes:
    """An OpenAI-style error event, which the openai SDK raises as an APIError."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"
