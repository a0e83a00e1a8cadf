"""GET /health: whether the gateway can serve, from a probe of llama-server that is cached briefly."""
import json
import threading
import time

from flask import Blueprint, Response, current_app, g

from ..errors import UpstreamError, error_body

bp = Blueprint("health", __name__)


class HealthProbe:
    """Asks llama-server how it is at most once per ttl seconds, however often /health is polled."""

    def __init__(self, upstream, ttl_s, up_gauge):
        self.upstream = upstream
        self.ttl = ttl_s
        self.up_gauge = up_gauge
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._report = None

    def report(self) -> dict:
        """The latest report: {"status": "ok"|"degraded"|"down", "upstream": {...}}."""
        with self._lock:
            if time.monotonic() - self._checked >= self.ttl:
                self._report = self._probe()
                self._checked = time.monotonic()
                self.up_gauge.set(0 if self._report["status"] == "down" else 1)
            return self._report

    def _probe(self) -> dict:
        started = time.perf_counter()
        upstream = {"url": self.upstream.base_url}
        try:
            self.upstream.request("GET", "/health", group="models").close()
        except UpstreamError as error:
            upstream.update(status="loading" if error.kind == "loading" else "unreachable", reason=error.message)
            return {"status": "down", "upstream": upstream}
        upstream.update(status="ok", latency_ms=round((time.perf_counter() - started) * 1000, 1))
        upstream.update(self._load())
        # Serving, but with requests queued behind busy slots: answers will be slow.
        status = "degraded" if upstream.get("requests_deferred") else "ok"
        return {"status": status, "upstream": upstream}

    def _load(self) -> dict:
        """Busy and queued requests from llama.cpp's /metrics, when it has them on."""
        try:
            response = self.upstream.request("GET", "/metrics", group="models")
        except UpstreamError:
            return {}
        load = {}
        for line in response.text.splitlines():
            name, _, number = line.partition(" ")
            if name in ("llamacpp:requests_processing", "llamacpp:requests_deferred"):
                load[name.split(":")[1]] = int(float(number))
        return load


def init_health(app, ttl_s):
    """Give app its health probe."""
    app.extensions["health_probe"] = HealthProbe(app.extensions["upstream"], ttl_s,
                                                 app.extensions["gateway_metrics"].upstream_up)


@bp.get("/health")
def health():
    """200 while llama-server can serve (status ok or degraded); 503 with the reason while it loads or is down."""
    report = current_app.extensions["health_probe"].report()
    if report["status"] != "down":
        return Response(json.dumps(report), mimetype="application/json")
    g.record.error = "upstream_unavailable"
    message = f"llama-server is not ready: {report['upstream']['reason']}"
    body = {**report, **error_body(503, message, code="upstream_unavailable")}
    return Response(json.dumps(body), status=503, mimetype="application/json", headers={"Retry-After": "1"})
