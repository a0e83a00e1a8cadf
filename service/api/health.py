"""GET /health."""
import time

from flask import Blueprint, g, jsonify

from ..errors import UpstreamError, UpstreamUnavailable
from ..relay import get_upstream

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():
    """200 when llama-server answers its own /health with 200; otherwise 503 saying why."""
    upstream = get_upstream()
    started = time.perf_counter()
    try:
        upstream.request("GET", "/health", group="models", record=g.record).close()
    except UpstreamError as error:
        raise UpstreamUnavailable(error.message, status=503,
                                  headers={"Retry-After": "1"}) from None
    latency_ms = round((time.perf_counter() - started) * 1000, 1)
    return jsonify({"status": "ok", "upstream": {"url": upstream.base_url, "status": "ok", "latency_ms": latency_ms}})
