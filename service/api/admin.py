"""POST /models/load and /models/unload: the admin API of models on demand, in llama-server router's shape.

Only ADMIN_API_KEY reaches these views (policy/hooks.py checks it, as it checks client keys elsewhere). The
answer is llama-server's {"success": true}, with the model's status after the call: an unload still waiting for
the model's requests when the bounded wait ends says "draining" (or "unloading"), and goes on by itself.
"""
from flask import Blueprint, current_app, g, jsonify

from ..errors import InvalidRequest
from ..proxy.routing import ModelNotFound
from ..schemas.admin import ModelActionSchema
from .request_body import read_json_body

bp = Blueprint("admin", __name__)
action_schema = ModelActionSchema()
REASON = "admin"


@bp.post("/models/load")
def load_model():
    """Load a model the gateway runs, waiting (bounded) until it serves."""
    name, pool = _pooled_model()
    return jsonify({"success": True, "status": pool.load(name, reason=REASON)})


@bp.post("/models/unload")
def unload_model():
    """Unload a model the gateway runs, waiting (bounded) until its llama.cpp has stopped (else draining)."""
    name, pool = _pooled_model()
    return jsonify({"success": True, "status": pool.unload(name, reason=REASON)})


def _pooled_model() -> tuple:
    """The body's model (by its id, an alias resolved) and the pool that runs it; 404 for a name the gateway does
    not know, 400 for one it routes to a llama-server it does not run (MODEL_UPSTREAMS, LLAMA_SERVER_URL)."""
    _, body = read_json_body(action_schema)
    router = current_app.extensions["router"]
    name = model_id(router, body["model"])
    pool = current_app.extensions.get("model_pool")
    if pool is not None and pool.model_named(name) is not None:
        g.record.model = name  # the operators' page lists the load or unload with its model
        return name, pool
    # Without a pool, the one route for any name is a llama-server someone else runs; with one, that route is
    # the pool's own model, which must be named as the pool knows it.
    if name in router.routes or (pool is None and router.fallback is not None):
        raise InvalidRequest("This model is served by a llama-server the gateway does not run (MODEL_UPSTREAMS or "
                             "LLAMA_SERVER_URL); the gateway never loads or unloads a llama-server it does not run",
                             param="model", code="model_not_managed")
    missing = ModelNotFound(name)
    g.record.model = missing.shown
    raise missing


def model_id(router, name) -> str:
    """The id of the model name means when it is one of a model's aliases, else name itself: the pool knows its
    models by id only. An id wins over another model's alias, as it does in the routes."""
    if name in router.routes:
        return name
    return next((route.spec.id for route in router.all_routes if name in route.aliases), name)
