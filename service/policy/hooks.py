"""The access policy around every request: request id, API key, per-client limits, CORS, and the log line."""
import re
import time

from flask import current_app, g, request
from flask_cors import CORS
from prometheus_client import Counter

from ..errors import current_family
from ..operations.request_log import RequestRecord, request_id_from
from .admin_guard import AdminGuard
from .auth import AdminKeyRequired, KeyRing, admin_keyring, authenticate_admin
from .budgets import BudgetExceeded, check_budget
from .key_limits import KeyLimits
from .limits import WINDOW_S, Limits, RateLimited, RateLimiter
from .shared_limits import SharedRateLimiter
from .stored_keys import authenticate_client, client_of_key
from .usage_sink import usage_sink

# Reachable without a key: load balancers and probes poll it.
PUBLIC_PATHS = ("/", "/health", "/openapi.json")
# Routes for ADMIN_API_KEY alone (models on demand, the models file's reload, the operators' page's data): no
# client key, no client limits. Matched by URL rule, so that only a request that reaches their views needs the key.
# Every rule under ADMIN_PREFIXES is one too (the stored keys' and the usage's routes).
ADMIN_RULES = ("/models/load", "/models/unload", "/models/reload", "/ui/api/state", "/ui/api/chat")
# The admin's own routes, and the operators' page's data (its charts, the requests in flight, llama.cpp's log).
ADMIN_PREFIXES = ("/admin/", "/ui/api/")
# The operators' page and its files: public, as they hold nothing but the sign-in form (its data is ADMIN_RULES').
UI_PAGE_RULES = ("/ui", "/ui/static/<path:filename>")
# Model listings: a key is needed, but no client limit counts them, as clients probe them (at start, to pick a
# model) and they never reach llama.cpp's slots.
UNLIMITED_RULES = ("/v1/models", "/models", "/v1/models/<path:model>", "/models/<path:model>")
# CORS_ORIGINS is for API clients: no other origin may read the operators' page or call the admin routes.
CORS_PATHS = re.compile(r"/(?!ui(/|$)|admin(/|$)|models/(load|unload|reload)$)")

# What a browser may read of an answer: the request id and every family's rate-limit headers.
EXPOSED_HEADERS = ["x-request-id", "request-id"] + [
    name.format(kind=kind, unit=unit) for name in ("x-ratelimit-{kind}-{unit}", "anthropic-ratelimit-{unit}-{kind}")
    for unit in ("requests", "tokens") for kind in ("limit", "remaining", "reset")]


def init_policy(app, settings):
    """Set up keys, limits and CORS for app, and the hooks that apply them to every request."""
    app.extensions["keyring"] = KeyRing.from_settings(settings)
    app.extensions["admin_keyring"] = admin_keyring(settings)
    default = Limits(settings["RATE_LIMIT_RPM"], settings["RATE_LIMIT_TPM"], settings["RATE_LIMIT_CONCURRENT"])
    # Not an environment setting: tests shorten the window so that waiting one out takes seconds.
    window_s = app.config.get("RATE_LIMIT_WINDOW_S", WINDOW_S)
    if settings["RATE_LIMIT_REDIS_URL"]:
        app.extensions["limiter"] = SharedRateLimiter(
            settings["RATE_LIMIT_REDIS_URL"], default, settings["RATE_LIMITS"], window_s,
            failure=settings["RATE_LIMIT_REDIS_FAILURE"],
            errors=app.extensions["gateway_metrics"].limit_store_errors)
    else:
        app.extensions["limiter"] = RateLimiter(default, settings["RATE_LIMITS"], window_s)
    if settings["CORS_ORIGINS"]:
        CORS(app, resources=CORS_PATHS, origins=list(settings["CORS_ORIGINS"]), methods=["GET", "POST", "OPTIONS"],
             allow_headers=["Authorization", "Content-Type", "x-request-id", "x-api-key", "anthropic-version",
                            "anthropic-beta"],
             expose_headers=EXPOSED_HEADERS, max_age=600)
    # Wrong admin keys, counted (never which key) and slowed down per address (admin_guard.py).
    failures = Counter("gateway_admin_auth_failures", "Wrong keys presented to the admin routes",
                       registry=app.extensions["metrics"].registry)
    app.extensions["admin_guard"] = AdminGuard(counter=failures)
    init_store_policy(app)
    app.before_request(begin_request)
    app.after_request(finish_request)


def init_store_policy(app):
    """With a key store (app.extensions["store"], service/store): its keys' limits and weights follow its changes,
    and every counted request's usage goes to it. Nothing without one."""
    store = app.extensions.get("store")
    if store is None:
        return
    key_limits = app.extensions["key_limits"] = KeyLimits(app.extensions["limiter"], app.extensions.get("scheduler"))
    store.keys.on_change(key_limits.keys_changed)
    key_limits.keys_changed(store.keys.cached())
    app.extensions["request_sinks"].append(usage_sink(store.usage, lambda rule: is_admin_rule(rule) or rule in
                                                      UNLIMITED_RULES))


def is_admin_rule(rule: str) -> bool:
    """Whether a URL rule is for ADMIN_API_KEY alone."""
    return rule in ADMIN_RULES or rule.startswith(ADMIN_PREFIXES)


def _needs_key() -> bool:
    if request.method == "OPTIONS" or request.path in PUBLIC_PATHS:
        return False
    if request.url_rule is not None and request.url_rule.rule in UI_PAGE_RULES:
        return False
    return request.path != "/metrics" or current_app.config["METRICS_REQUIRE_KEY"]


def _is_admin() -> bool:
    # A CORS preflight (OPTIONS) carries no key, as on every route; the POST after it needs the admin key.
    return request.method != "OPTIONS" and request.url_rule is not None and is_admin_rule(request.url_rule.rule)


def _is_page(path) -> bool:
    return path == "/ui" or path.startswith("/ui/")


def _page_miss():
    """A path under /ui that names no route, or a method its route does not take: 404 or 405 at once (before any
    key is asked for: they hold nothing), answered as the page's other errors are."""
    missed = request.routing_exception
    if missed is not None and getattr(missed, "code", None) in (404, 405) and _is_page(request.path):
        raise missed


def _authenticate_admin(record):
    """The admin key, or a refusal that still names the client whose key was tried (point 9 of issue 24)."""
    app = current_app
    client_of = client_of_key(app.extensions["keyring"], app.extensions.get("store"))
    try:
        record.client_id = authenticate_admin(app.extensions["admin_keyring"], client_of,
                                              app.extensions["admin_guard"], request.remote_addr)
    except AdminKeyRequired as refused:
        record.client_id = refused.client
        raise


def begin_request():
    """Give the request its id, record and API family, then check its key and its client's limits (before any
    upstream call); on an admin route, the admin key instead."""
    current_family()  # looked up once, from the matched route, and kept on g for every answer below
    g.record = record = RequestRecord(request_id_from(request.headers.get("x-request-id")), request.method,
                                      request.path, time.perf_counter(),
                                      route=request.url_rule.rule if request.url_rule else "unmatched",
                                      # the operators' page's last requests and the like, fed by the log line
                                      sinks=current_app.extensions["request_sinks"])
    current_app.extensions["gateway_metrics"].in_flight.inc()
    current_app.extensions["lifecycle"].begin()
    _page_miss()
    if _is_admin():
        _authenticate_admin(record)
        return
    if not _needs_key():
        return
    store = current_app.extensions.get("store")
    record.client_id, key = authenticate_client(current_app.extensions["keyring"], store)
    limited = record.route not in UNLIMITED_RULES
    if key is not None:
        # Its limits and weight are its client's already: the store tells KeyLimits of every change (on_change).
        g.stored_key, record.key_id = key, key.id
        if limited:
            try:
                check_budget(key, store.usage)
            except BudgetExceeded:
                record.rate_limited = "budget"
                raise
    limiter = current_app.extensions["limiter"]
    if limiter.active and limited:
        try:
            g.lease = limiter.acquire(record.client_id)
        except RateLimited as refused:
            record.rate_limited = refused.limit
            raise


def finish_request(response):
    """Echo the request id and rate-limit headers; free the client's slot and log once the body is sent."""
    record = g.get("record")
    if record is None:
        return response
    lease = g.get("lease")
    admission = g.get("admission")  # its model and its slot (service/proxy/admission.py)
    family = current_family()
    for name in family.request_id_headers:
        response.headers[name] = record.request_id
    if lease is not None and lease.rate is not None:
        response.headers.update(family.rate_headers(lease.rate))
    record.status = response.status_code
    if _is_page(request.path):
        # The page's blueprint adds them to its own answers; these are the ones no route of it answered.
        from ..ui.views import SECURITY_HEADERS

        response.headers.update(SECURITY_HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")
    limiter = current_app.extensions["limiter"]
    metrics = current_app.extensions["gateway_metrics"]
    lifecycle = current_app.extensions["lifecycle"]

    def on_close():
        # Runs when the server closes the body: after the last byte of a stream, or when its client left.
        if lease is not None:
            limiter.release(lease, record.total_tokens)
        if record.replica is not None:
            record.replica.release()
        if admission is not None:
            admission.release()
        metrics.in_flight.dec()
        metrics.observe(record)
        record.log()
        lifecycle.end()

    response.call_on_close(on_close)
    return response
