"""Relay llama-server's answers to the client: whole JSON bodies as they came, SSE streams event by event.

What differs between the API families (where usage is reported, how a broken stream ends, edits a family's
events need) is asked of the request's family (service/families). Token usage is read from what passes through
(for the token limit and the log line). A request body is rewritten only by its model's request rules (defaults,
a max-tokens ceiling, strips: request_rules.py, applied right after the route is found, so that placement, the
queue and llama.cpp all see the body the rules made), and for an OpenAI chat stream, to ask for the usage chunk
the client did not ask for (usage_request.py); that chunk is then taken out again so that the client gets exactly
the stream it asked for. Where the gateway routes by model, the answers' "model" members are set to the name the
client sent (an alias stays the alias). llama.cpp's report of a failure mid-stream ends the relayed stream with
the family's own error event. A stream whose client takes no bytes for STREAM_STALL_TIMEOUT_S is cut
(disconnect.StallClock): llama.cpp's slot is freed, and the client gets nothing more.
"""
import json
import logging
import re
from dataclasses import dataclass

from flask import Response, current_app, g, request, stream_with_context

from ..errors import (ApiError, CancelledByOperator, ClientClosedRequest, ShuttingDown, UpstreamError,
                      UpstreamUnavailable, current_family)
from ..families.family import StreamRequest
from ..policy.model_access import check_model_allowed
from . import sse
from .admission import admit
from .affinity import prefix_keys
from .disconnect import CLIENT_STALLED, StallClock, UpstreamCall
from .request_rules import apply as apply_rules
from .routing import ModelNotFound
from .usage_request import ask_for_usage, asks_for_usage
from .warm_request import warm_request

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# A stream waiting for its model to load, or for a slot, gets this SSE comment (which clients ignore) every few
# seconds.
WAIT_KEEPALIVE_S = 3.0
WAITING_COMMENT = b": waiting for the model\n\n"

# A "model" member of a JSON object. Inside a JSON string every '"' is escaped, so this matches members only.
_MODEL_MEMBER = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')


@dataclass(frozen=True)
class Endpoint:
    """One of llama-server's endpoints, as a view sends to it."""

    path: str  # on llama-server
    timeouts: str  # the timeout group (CHAT_*, COMPLETIONS_*, EMBEDDINGS_*, MODELS_* settings)
    asks_stream_usage: bool = False  # a stream reports usage only when asked (OpenAI's chat)
    answers: tuple = (dict,)  # the JSON types its answer may be (TEI's rerank format is a bare array)
    takes_slot: bool = True  # llama.cpp answers it in one of its slots (not so the tokenizer's endpoints)
    reuses_prompt: bool = False  # a generation: llama.cpp's prompt cache pays off, so placed cache-aware


def get_upstream():
    """Return the app's Upstream (one per app, in app.extensions)."""
    return current_app.extensions["upstream"]


def send_watched(route, endpoint: Endpoint, raw: bytes, body: dict, stream: bool, stalled=None):
    """POST raw to a replica of route as an UpstreamCall that is cut if this request's client disconnects
    (where waitress can tell), if stalled() turns true, or when the shutdown grace runs out; return (response,
    call). The call stays watched for a stream (its relay unwatches it) and is unwatched at once otherwise, or on
    any failure."""
    record, watch, upstream = g.record, current_app.extensions["disconnect_watch"], get_upstream()
    admission = g.get("admission")
    if admission is not None and admission.warm is not None and admission.turn is not None:
        raw = admission.warm.before_send(admission.turn.slot, raw)  # its saved conversation restored, its slot named
    call = UpstreamCall()
    call.record, call.stream = record, stream  # the operators' page lists the calls in flight, and cancels one
    watch.watch(call, request.environ.get("waitress.client_disconnected"), stalled)
    headers = {"X-Request-Id": record.request_id}
    keys = prefix_keys(body) if endpoint.reuses_prompt and route.affinity is not None else None

    def send(replica):
        return upstream.request("POST", endpoint.path, group=endpoint.timeouts, base_url=replica.url, body=raw,
                                stream=stream, record=record, headers=headers, call=call)

    try:
        try:
            record.replica, response = route.send(send, record, keys)
        except UpstreamUnavailable as error:
            hold = admission.hold if admission is not None else None
            # Its llama.cpp had died when the request was sent (refused: nothing reached it): once restarted, it
            # takes the request. One cut off while llama.cpp worked on it is not sent again: it may be what killed it.
            if hold is None or error.kind != "refused" or not hold.wait_for_restart(admission.gone):
                raise
            record.replica, response = route.send(send, record, keys)
    except BaseException:
        watch.unwatch(call)
        raise
    if not stream:
        watch.unwatch(call)
    return response, call


def routed(endpoint: Endpoint, raw: bytes, body: dict) -> tuple:
    """(route, raw, body): the route of the body's model, and the body as its model's request rules make it
    (the client's own bytes where it has none, or they change nothing)."""
    try:
        route = current_app.extensions["router"].route(body.get("model"))
    except ModelNotFound as error:
        g.record.model = error.shown  # for the operators' page: the name asked, made safe to show
        raise
    g.record.model = route.name if route.name is not None else route.spec.id if route.spec is not None else None
    check_model_allowed(route, body.get("model"))  # a key made for some models only: 403 for the others
    raw, body, lowered_from = apply_rules(route.rules, raw, body, endpoint.path)
    if lowered_from is not None:
        g.record.max_tokens_lowered_from = lowered_from
    return route, raw, body


def proxy_json_post(endpoint: Endpoint, raw: bytes, body: dict) -> Response:
    """POST the client's bytes to the model's llama-server and answer with its JSON body (unchanged, but for
    the model's name where the gateway routes by model)."""
    return _post_json(endpoint, *routed(endpoint, raw, body))


def _post_json(endpoint: Endpoint, route, raw: bytes, body: dict) -> Response:
    """proxy_json_post once the route is found and its rules applied."""
    # Its model's load, then a slot: bounded by LLAMA_STARTUP_TIMEOUT_S and QUEUE_TIMEOUT_S. Without a timeout of
    # its own the wait ends with both had, or raises (a 503, a 429, or the client gone).
    admit(route, endpoint.takes_slot, warm_request(route, endpoint, body, g.record)).wait()
    response, _ = send_watched(route, endpoint, raw, body, stream=False)
    answer, parsed = get_upstream().read_json(response, endpoint.path, endpoint.answers)
    g.record.add_tokens(*current_family().usage.read(parsed))
    if route.name is not None:
        answer = answer_with_model(answer, parsed, body["model"])
    return Response(answer, status=response.status_code, mimetype="application/json")


def answer_with_model(answer: bytes, parsed, name: str) -> bytes:
    """The answer with its top-level "model" member set to name. A "model" member deeper in it is the model's
    own words (Anthropic's tool_use input is an object, and may well say "model"): then, and only then, the
    answer is encoded anew from what was parsed, so that those words stay as they were."""
    if not isinstance(parsed, dict) or "model" not in parsed:
        return answer
    if len(_MODEL_MEMBER.findall(answer)) == 1:
        return rename_model(answer, model_member(name))
    return json.dumps({**parsed, "model": name}).encode()


def model_member(name: str) -> bytes:
    """The "model" member that gives the client back the name it asked for."""
    return b'"model":' + json.dumps(name).encode()


def rename_model(data: bytes, member: bytes) -> bytes:
    """Put member in place of every "model" member in data (whatever the upstream calls its model file)."""
    return _MODEL_MEMBER.sub(member.replace(b"\\", b"\\\\"), data)


def proxy_generation(endpoint: Endpoint, raw: bytes, body: dict) -> Response:
    """POST a generation; relay it as SSE when the client asked for a stream."""
    route, raw, body = routed(endpoint, raw, body)
    if body.get("stream") is not True:
        return _post_json(endpoint, route, raw, body)
    admission = admit(route, endpoint.takes_slot, warm_request(route, endpoint, body, g.record))
    if not admission.wait(timeout=0):
        return _stream_after_wait(admission, endpoint, raw, body, route)
    stream = open_stream(endpoint, raw, body, route)
    try:
        relayed = Response(timed_writes(stream, relay_events(stream)), status=200, mimetype="text/event-stream",
                           headers=SSE_HEADERS)
        # Not the generator's finally: a generator that was never started does not run it when closed, and a
        # server may close the body without reading any of it. Registered before the policy's own close (the
        # log line and metrics), so that those see the stream ended.
        relayed.call_on_close(stream.close)
    except BaseException:
        stream.close()
        raise
    return relayed


def _stream_after_wait(admission, endpoint, raw, body, route) -> Response:
    """A stream whose model is still loading, or whose turn at a slot has not come: answer at once, with an SSE
    comment every few seconds while it waits (so that clients and proxies in between do not time out), then the
    stream; or the family's error event if the load fails or the wait times out."""
    opened = []

    def events():
        try:
            while not admission.wait(WAIT_KEEPALIVE_S):
                yield WAITING_COMMENT
            opened.append(open_stream(endpoint, raw, body, route))
        except ApiError as error:
            g.record.error, g.record.upstream_error = error.code, getattr(error, "kind", None)
            family = current_family()
            yield family.events(family, StreamRequest(body.get("model"), lambda path: None)).error_event(
                error.status, error.client_message, **error.fields)
            return
        yield from timed_writes(opened[0], relay_events(opened[0]))

    relayed = Response(stream_with_context(events()), status=200, mimetype="text/event-stream",
                       headers=SSE_HEADERS)
    relayed.call_on_close(lambda: opened and opened[0].close())
    return relayed


def open_stream(endpoint: Endpoint, raw: bytes, body: dict, route) -> "Stream":
    """Send a stream's request to a replica of route and return the Stream that relays its answer."""
    strip_usage = endpoint.asks_stream_usage and not asks_for_usage(body)
    if strip_usage:
        raw = ask_for_usage(raw, body)
    stall_timeout = current_app.config["STREAM_STALL_TIMEOUT_S"]
    clock = StallClock(stall_timeout) if stall_timeout else None  # 0: a stream may wait for its client forever
    response, call = send_watched(route, endpoint, raw, body, stream=True, stalled=clock and clock.stalled)
    watch = current_app.extensions["disconnect_watch"]
    try:
        upstream, replica_url, family = get_upstream(), g.record.replica.url, current_family()

        def ask(path):
            """An editor's question about this request, to the replica serving its stream: llama.cpp's parsed
            answer to the client's body POSTed to path, or None (a stream that works goes on regardless)."""
            try:
                answer = upstream.request("POST", path, group=endpoint.timeouts, base_url=replica_url, body=raw)
                return upstream.read_json(answer, path)[1]
            except UpstreamError:
                return None

        stream = Stream(upstream, response, endpoint.timeouts, g.record, call, watch,
                        current_app.extensions["gateway_metrics"].open_streams, family,
                        family.events(family, StreamRequest(body.get("model"), ask)),
                        strip_usage, None if route.name is None else model_member(body["model"]), clock)
    except BaseException:
        watch.unwatch(call)
        response.close()
        raise
    stream.open_streams.inc()
    return stream


@dataclass
class Stream:
    """One relayed stream and everything its generator needs once the request context is gone."""

    upstream: object
    response: object
    group: str  # its timeout group
    record: object
    call: UpstreamCall
    watch: object
    open_streams: object
    family: object  # the client's API family
    editor: object  # the family's editor of this stream's events
    strip_usage: bool
    model: bytes = None  # the "model" member every event gets, where the gateway routes by model
    clock: StallClock = None  # times the writes to the client; None when STREAM_STALL_TIMEOUT_S is 0

    def close(self):
        """Let go of the upstream call (the response calls this once, when the server closes it): when the
        client went away, llama.cpp sees its connection close and stops generating. It never raises: the
        policy's own close (the client's lease, the log line) runs after it."""
        try:
            self.watch.unwatch(self.call)
            self.open_streams.dec()
        finally:
            try:
                self.response.close()
            except Exception:  # noqa: BLE001 - a connection that breaks while closing is closed all the same
                log.debug("closing a relayed stream's upstream response failed", exc_info=True)

    def fail(self, error) -> bytes:
        """Record error on the request and return the family's event that ends the stream with it."""
        self.record.error, self.record.upstream_error = error.code, getattr(error, "kind", None)
        return self.editor.error_event(error.status, error.client_message, **error.fields)


def timed_writes(stream: Stream, events):
    """Pass events on, timing each write to the client for the stall check; stop, sending nothing more, once
    the call was cut because the client stopped reading (the server asks for the next event only after the last
    one was written, so this is the first moment the relay can tell)."""
    clock = stream.clock
    if clock is None:
        yield from events
        return
    try:
        for data in events:
            clock.writing()
            yield data
            clock.written()
            if stream.call.aborted == CLIENT_STALLED:
                return
    finally:
        events.close()
        # Also when the client left while its write was blocked: it had stalled first.
        if stream.call.aborted == CLIENT_STALLED:
            stream.record.error = CLIENT_STALLED


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
            cut = sse.end_of_last_event(pending)
            if cut:
                events, pending = pending[:cut], pending[cut:]
                events, failed = _edit(events, stream)
                if events:
                    if record.ttft_ms is None:
                        record.ttft_ms = record.elapsed_ms()
                    record.chunks_sent += 1
                    yield events
                if failed:
                    return
        if pending:
            events, _ = _edit(pending, stream)
            if events:
                yield events
    except ClientClosedRequest as gone:
        record.error = gone.code  # nobody is left to tell
    except (ShuttingDown, CancelledByOperator, UpstreamError) as error:
        # The client is still there: an operator's Cancel, as a shutdown's cut, ends its stream with the family's
        # error event (SDKs take a stream that just stops for a finished answer).
        yield stream.fail(error)


def _edit(events: bytes, stream: Stream) -> tuple:
    """Return (what to send of these events, whether llama.cpp reported a failure in them)."""
    failed = False
    # Cheap tests first: most events are content chunks that need no parsing.
    if stream.editor.edits or b"error" in events or stream.family.usage.marked(events):
        events, failed = _read_events(events, stream)
    if stream.model is not None:
        events = rename_model(events, stream.model)
    return events, failed


def _read_events(events: bytes, stream: Stream) -> tuple:
    """Record the usage these events carry, drop the usage-only chunk the gateway asked for on its own, let the
    family edit each event, and stop at llama.cpp's report of a failure; return (what to send, failed)."""
    kept = []
    for event, end in sse.split_events(events):
        if b"error" in event:
            reported = reported_error(event)
            if reported is not None:
                kept.append(stream.fail(reported))
                return b"".join(kept), True  # nothing after it (llama.cpp may still send [DONE])
        parts = ((event, end),)
        if event and stream.editor.edits:
            parts = sse.split_events(stream.editor.edit(event) + end)  # it may put events of its own first
        for part, part_end in parts:
            if stream.family.usage.marked(part):
                chunk = sse.data_json(part)
                if isinstance(chunk, dict):
                    stream.record.add_tokens(*stream.family.usage.read(chunk))
                    if stream.strip_usage and chunk.get("choices") == []:
                        continue
            kept.append(part + part_end)
    return b"".join(kept), False


def reported_error(event: bytes):
    """The UpstreamError for llama.cpp's report of a failure mid-stream, if event is one; else None.

    Later llama.cpp builds send it as a data event with an "error" member (in an `event: error` on Anthropic's
    routes); earlier builds send an "error:" field, then [DONE], which OpenAI clients never read. Either way the
    client gets its family's own error event, with llama.cpp's message.
    """
    fields = sse.field_values(event, b"error")
    if fields:
        return _reported_error(sse.loads(b"\n".join(fields)))
    if b'"error"' in event:
        chunk = sse.data_json(event)
        if isinstance(chunk, dict) and "error" in chunk:
            return _reported_error(chunk["error"])
    return None


def _reported_error(reported) -> UpstreamError:
    """The gateway's error for llama.cpp's error object: its message is passed on (to the client only, as it can
    quote the request), anything else only described."""
    if isinstance(reported, dict) and isinstance(reported.get("message"), str):
        message = reported["message"]
    elif isinstance(reported, str):
        message = reported
    else:
        message = "an error report that is not an error object"
    status = reported.get("code") if isinstance(reported, dict) else None
    return UpstreamError("llama-server failed mid-stream", kind="5xx", detail=message,
                         upstream_status=status if type(status) is int else None)
