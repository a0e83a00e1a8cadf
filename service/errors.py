"""The gateway's exception tree, and the handlers that turn any error into JSON in the client's API family.

Contract: every error the gateway answers is in the envelope of the API family the client speaks (OpenAI's
{"error": {"message", "type", "param", "code"}}, or Anthropic's {"type": "error", "error": {...}}), built by
that family's error_body() (service/families); views raise ApiError subclasses and never build error JSON.
"""
import logging

from flask import Response, g, has_request_context, request
from werkzeug.exceptions import HTTPException

from .families import OPENAI, family_of_request

log = logging.getLogger(__name__)


def error_type(status: int) -> str:
    """Return the OpenAI error type for an HTTP status."""
    return OPENAI.error_type(status)


def error_body(status: int, message: str, *, type: str = None, param: str = None, code: str = None) -> dict:
    """The OpenAI error envelope, for answers outside any API family (/health, waitress's own errors)."""
    return OPENAI.error_body(status, message, type=type, param=param, code=code)


def current_family():
    """The API family of the request being answered (OpenAI's outside a request)."""
    if not has_request_context():
        return OPENAI
    family = g.get("family")
    if family is None:
        family = g.family = family_of_request()
    return family


def error_response(status: int, message: str, *, headers=None, family=None, **fields) -> Response:
    """Return a JSON error response in the envelope (and with the status) of the client's API family."""
    family = family or current_family()
    body = family.error_json(status, message, **fields)
    return Response(body, status=family.status(status, fields.get("code")), headers=headers,
                    mimetype="application/json")


class ApiError(Exception):
    """An error the gateway answers with: a status, a message, and the envelope's optional fields."""

    status = 500
    code = None

    def __init__(self, message, *, status=None, type=None, param=None, code=None, headers=None):
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.type = type
        self.param = param
        self.code = code or self.code
        self.headers = headers or {}

    @property
    def fields(self) -> dict:
        """The envelope's optional fields: type, param and code."""
        return {"type": self.type, "param": self.param, "code": self.code}

    @property
    def client_message(self) -> str:
        """What the client is told: the message, and any detail that is the client's alone (never logged)."""
        return self.message

    def headers_for(self, family) -> dict:
        """The headers this error answers with in family's conventions."""
        return self.headers

    def response(self, family=None) -> Response:
        """This error as a JSON response in family's envelope (by default the request's)."""
        family = family or current_family()
        return error_response(self.status, self.client_message, headers=self.headers_for(family), family=family,
                              **self.fields)


class InvalidRequest(ApiError):
    """The client's request is malformed; param names the offending field."""

    status = 400


class UnsupportedMediaType(ApiError):
    """The request body is not declared as JSON."""

    status = 415
    code = "unsupported_media_type"


class ClientClosedRequest(ApiError):
    """The client went away before its answer was ready (nginx's 499); nobody reads this answer."""

    status = 499
    code = "client_closed_request"

    def __init__(self, message="The client disconnected; its llama-server call was closed"):
        super().__init__(message)


class ShuttingDown(ApiError):
    """The gateway is stopping: it takes no new requests, and ends the ones still running past the grace."""

    status = 503
    code = "server_shutting_down"

    def __init__(self, message="The gateway is shutting down; retry on another instance or after its restart"):
        super().__init__(message, headers={"Retry-After": "5"})


class CancelledByOperator(ApiError):
    """An operator cancelled the request on the gateway's page: its llama.cpp call was cut. The client is told
    so (never a silent end, never a 499 that blames it), and its SDK is told not to send it again."""

    status = 503
    code = "cancelled_by_admin"

    def __init__(self, message="An operator cancelled this request on the gateway's page"):
        super().__init__(message, type="server_error", headers={"x-should-retry": "false"})


# Kinds of upstream failure after which llama.cpp may have read the request and died of it. The openai and
# anthropic SDKs resend a 5xx (twice by default) unless the answer says not to (PROTOCOL.md "SDK retries"): the
# resend would wait out llama.cpp's restart and run the prompt that crashed it again.
NOT_TO_BE_RESENT = frozenset({"reset"})


class UpstreamError(ApiError):
    """llama-server could not give a usable answer; kind names the failure for metrics."""

    status = 502
    code = "upstream_error"
    kind = "bad_answer"

    def __init__(self, message, *, kind=None, upstream_status=None, detail=None, **fields):
        super().__init__(message, **fields)
        self.kind = kind or self.kind
        self.upstream_status = upstream_status  # the upstream's HTTP status, when it answered with an error
        # llama.cpp's own words, for the client only: they can quote the request (a tool call, a message), so
        # they never reach a log line, a metric or an ejection's reason.
        self.detail = detail

    @property
    def client_message(self) -> str:
        """The message, with llama.cpp's own words where they are the client's to read."""
        return f"{self.message}: {self.detail}" if self.detail else self.message

    def headers_for(self, family) -> dict:
        """The error's headers, and x-should-retry: false where a resend by the client's SDK could run again a
        request that llama.cpp may have died of."""
        if self.kind in NOT_TO_BE_RESENT:
            return {**self.headers, "x-should-retry": "false"}
        return self.headers


class UpstreamUnavailable(UpstreamError):
    """llama-server could not be reached, or said it cannot serve yet (503 with Retry-After)."""

    code = "upstream_unavailable"
    kind = "refused"


class UpstreamTimeout(UpstreamError):
    """llama-server stopped answering for longer than the route's read timeout."""

    status = 504
    code = "upstream_timeout"
    kind = "timeout"


class UpstreamBadResponse(UpstreamError):
    """llama-server's answer was cut off or is not what the protocol says."""

    code = "upstream_bad_response"


class UpstreamRejected(UpstreamError):
    """llama-server refused the request (a 4xx, or 501); its status and message are passed on."""

    code = None
    kind = None  # the client's mistake, not an upstream failure


def _http_message(error: HTTPException) -> str:
    if error.code == 404:
        return f"Unknown route: {request.method} {request.path}"
    if error.code == 405:
        allowed = ", ".join(sorted(m for m in error.valid_methods or () if m not in ("HEAD", "OPTIONS")))
        return f"Method {request.method} is not allowed on {request.path}; use {allowed}"
    if error.code == 413:
        limit = request.max_content_length
        return f"Request body is too large; the limit is {limit} bytes (MAX_BODY_BYTES)"
    return error.description or error.name


def register_error_handlers(app):
    """Make every error the app can produce, from any layer, answer in the envelope of the client's family."""

    def note_error(kind, upstream_kind=None):
        record = g.get("record")
        if record is not None:
            record.error = kind
            record.upstream_error = upstream_kind

    @app.errorhandler(ApiError)
    def handle_api_error(error):
        note_error(error.code or error_type(error.status), getattr(error, "kind", None))
        if error.status >= 500:
            # Upstream trouble is the operator's business: say what failed (never a prompt or a key).
            log.warning("%s %s answered %d: %s", request.method, request.path, error.status, error.message)
        return error.response()

    @app.errorhandler(HTTPException)
    def handle_http_exception(error):
        note_error(error_type(error.code))
        headers = {"Allow": ", ".join(error.valid_methods)} if getattr(error, "valid_methods", None) else None
        return error_response(error.code, _http_message(error), headers=headers)

    @app.errorhandler(Exception)
    def handle_unexpected(error):
        note_error("internal_error")
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "The gateway hit an internal error; see its log for details.",
                              code="internal_error")
