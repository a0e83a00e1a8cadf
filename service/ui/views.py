"""GET /ui, the page for the people who run the gateway, and the JSON it reads and sends.

The page and its static files are public: they hold no data, only the sign-in form. Everything the page shows
comes from /ui/api/... (state, history, in flight, a model's llama.cpp log, cancel, the playground's chat), which
need ADMIN_API_KEY (policy/hooks.py checks it, as on the admin routes), sent by the page's script as
Authorization: Bearer; the key lives in the tab's sessionStorage, never in a cookie or a URL. Loading and
unloading use the admin routes themselves.
"""
import time

from flask import Blueprint, current_app, g, jsonify, render_template, request

from ..api.chat import CHAT
from ..api.chat import schema as chat_schema
from ..api.request_body import read_json_body
from ..errors import InvalidRequest
from ..operations.history import WINDOWS, History
from ..policy.auth import ADMIN_CLIENT, AdminKeyRequired
from ..proxy.relay import proxy_generation
from ..proxy.routing import ModelNotFound
from .inflight import cancel, in_flight
from .model_life import LifeBook
from .recent import RecentRequests
from .state import gateway_state, queue_depths

bp = Blueprint("ui", __name__, template_folder="templates", static_folder="static", static_url_path="/ui/static")

# Only the gateway's own files run: no inline script or style, no other origin, no framing, no form posted.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


# The page's own polls: kept out of its list of requests and its charts, as /ui/api/state is (request_log.py),
# else an open log panel alone would fill both.
PAGE_POLLS = ("/ui/api/history", "/ui/api/inflight", "/ui/api/models/<path:name>/log")


@bp.record_once
def _keep_history(state):
    app = state.app
    extensions = app.extensions
    extensions["ui_started_at"] = time.time()
    recent = extensions["recent_requests"] = RecentRequests()
    history = extensions["history"] = History(
        models=lambda: [route.name for route in extensions["router"].all_routes if route.name is not None],
        depths=lambda: queue_depths(extensions))
    book = extensions["model_life"] = LifeBook()
    if extensions.get("model_pool") is not None:
        extensions["model_pool"].listeners.append(book.observe)

    def keep(entry, record):
        if entry["route"] in PAGE_POLLS and entry.get("status", 500) < 400:
            return
        recent.add(entry)
        history.record(entry)

    extensions["request_sinks"].append(keep)


@bp.before_request
def _admin_only():
    """The page's data is the admin's alone, whatever policy/hooks.py's ADMIN_RULES list (a second lock: a route
    missing there would otherwise answer any client key)."""
    record = g.get("record")
    if request.path.startswith("/ui/api/") and (record is None or record.client_id != ADMIN_CLIENT):
        raise AdminKeyRequired("This route needs the admin key (ADMIN_API_KEY); a client's API key may not use it")


@bp.after_request
def _secure(response):
    """The page's answers, JSON and errors included: the policy above, and nothing kept by caches."""
    response.headers.update(SECURITY_HEADERS)
    response.headers.setdefault("Cache-Control", "no-store")
    # A static file is sent "passed through" (the server's file wrapper), and werkzeug then never runs the
    # response's close callbacks: the policy's close (the log line, the in-flight counts that graceful shutdown
    # waits on) would never run. Sent as an ordinary body, it is closed like every other answer.
    response.direct_passthrough = False
    return response


@bp.get("/ui")
def page():
    """The page: a sign-in form, or how to turn the page on while ADMIN_API_KEY is unset."""
    return render_template("ui/index.html", admin_on=bool(current_app.config["ADMIN_API_KEY"]))


@bp.get("/ui/api/state")
def state():
    """Models, clients and the last requests, for the page's refresh."""
    return jsonify(gateway_state(current_app))


@bp.get("/ui/api/history")
def history():
    """Requests/s, errors, tokens/s, time to first token and queue depth over the last hour or day."""
    window = request.args.get("window", "hour")
    if window not in WINDOWS:
        raise InvalidRequest(f"window must be one of {', '.join(WINDOWS)}, not {window[:40]!r}",
                             type="invalid_request_error", param="window")
    return jsonify(current_app.extensions["history"].series(window))


@bp.get("/ui/api/inflight")
def inflight():
    """The requests llama.cpp is answering now."""
    return jsonify({"data": in_flight(current_app.extensions["disconnect_watch"])})


@bp.post("/ui/api/requests/<handle>/cancel")
def cancel_request(handle):
    """Cut the request in flight with that handle (/ui/api/inflight's) as its client's disconnect would: llama.cpp
    frees its slot, and the client is told that an operator cancelled it."""
    cancel(current_app.extensions["disconnect_watch"], handle)
    return jsonify({"cancelled": True})


@bp.get("/ui/api/models/<path:name>/log")
def model_log(name):
    """The last lines its llama.cpp printed (a model the gateway runs): for this page only, never the log."""
    pool = current_app.extensions.get("model_pool")
    model = pool.model_named(name) if pool is not None else None
    if model is None:
        raise ModelNotFound(name)
    lines = getattr(model.supervisor, "lines", None)
    return jsonify({"model": name, "lines": list(lines.copy()) if lines is not None else []})


@bp.post("/ui/api/chat")
def chat():
    """The playground: a chat completion as /v1/chat/completions makes it, for the admin (client "admin")."""
    raw, body = read_json_body(chat_schema)
    return proxy_generation(CHAT, raw, body)
