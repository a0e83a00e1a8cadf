"""GET / (and HEAD /): a small answer that says the gateway is here, for clients that probe the base URL."""
from flask import Blueprint, jsonify

from .. import __version__

bp = Blueprint("root", __name__)


@bp.get("/")
def root():
    """Name the gateway and where its API is; clients probe it without a key (Claude Code sends HEAD / first)."""
    return jsonify(name="llama.cpp gateway", version=__version__, api="/v1", openapi="/openapi.json",
                   health="/health")
