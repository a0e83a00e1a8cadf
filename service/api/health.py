"""GET /health: whether the gateway can serve, from the health probe's latest report."""
import json

from flask import Blueprint, Response, current_app, g

from ..errors import error_body

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():
    """200 while llama-server can serve (status ok or degraded); 503 with the reason while it loads or is down."""
    report = current_app.extensions["health_probe"].report()
    if report["status"] != "down":
        return Response(json.dumps(report), mimetype="application/json")
    g.record.error = "upstream_unavailable"
    message = (f"llama-server is not ready: {report['upstream']['reason']}" if "upstream" in report
               else "no model has a llama-server that can serve")
    body = {**report, **error_body(503, message, code="upstream_unavailable")}
    return Response(json.dumps(body), status=503, mimetype="application/json", headers={"Retry-After": "1"})
