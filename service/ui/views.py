"""GET /ui, the page for the people who run the gateway, and the JSON it reads and sends.

The page and its static files are public: they hold no data, only the sign-in form. Everything the page shows
comes from /ui/api/state and the playground's /ui/api/chat, which need ADMIN_API_KEY (policy/hooks.py checks it,
as on the admin routes), sent by the page's script as Authorization: Bearer; the key lives in the tab's
sessionStorage, never in a cookie or a URL. Loading and unloading use the admin routes themselves.
"""
from flask import Blueprint, current_app, jsonify, render_template

from ..api.chat import CHAT
from ..api.chat import schema as chat_schema
from ..api.request_body import read_json_body
from ..proxy.relay import proxy_generation
from .recent import RecentRequests
from .state import gateway_state

bp = Blueprint("ui", __name__, template_folder="templates", static_folder="static", static_url_path="/ui/static")

# Only the gateway's own files run: no inline script or style, no other origin, no framing, no form posted.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


@bp.record_once
def _keep_recent(state):
    recent = state.app.extensions["recent_requests"] = RecentRequests()
    state.app.extensions["request_sinks"].append(lambda entry, record: recent.add(entry))


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


@bp.post("/ui/api/chat")
def chat():
    """The playground: a chat completion as /v1/chat/completions makes it, for the admin (client "admin")."""
    raw, body = read_json_body(chat_schema)
    return proxy_generation(CHAT, raw, body)
