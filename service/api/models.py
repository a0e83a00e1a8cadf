"""GET /v1/models and GET /v1/models/{model}: each model once, by its id, with its aliases and what it can take
beside text ("capabilities": ["vision"] where the gateway gives it a projector)."""
from flask import Blueprint, current_app, g, jsonify

from ..errors import UpstreamBadResponse, UpstreamError
from ..policy.model_access import check_model_allowed, key_allows
from ..proxy.relay import get_upstream

bp = Blueprint("models", __name__)


@bp.get("/v1/models")
@bp.get("/models")
def list_models():
    """List the models in OpenAI's shape: {object: list, data: [{id, object, created, owned_by, ...}]}: the
    configured ones where the gateway routes by model, else llama-server's own; for a stored key limited to some
    models (g.stored_key), only those."""
    router = current_app.extensions["router"]
    fallback = router.fallback
    key = g.get("stored_key")
    if fallback is not None:
        entries = [entry for entry in _fallback_entries(fallback) if key_allows(key, fallback, entry["id"])]
        # llama.cpp adds an ollama-style "models" list beside "data"; OpenAI clients expect only "data".
        vision = _has_projector(fallback)
        return jsonify({"object": "list", "data": [_openai_model(entry, fallback.spec, vision) for entry in entries]})
    return jsonify({"object": "list", "data": [_routed_model(route) for route in router.routes.values()
                                               if key_allows(key, route)]})


@bp.get("/v1/models/<path:model>")
@bp.get("/models/<path:model>")
def retrieve_model(model):
    """One model in OpenAI's shape, by its id or an alias; 404 model_not_found for a name the gateway does not
    route. With one llama-server for any name, every name is that server's model. A model the request's stored
    key may not use is 403 model_not_allowed, as its use would be."""
    router = current_app.extensions["router"]
    fallback = router.fallback
    check_model_allowed(fallback or router.route(model), model)
    if fallback is not None:
        entries = _fallback_entries(fallback)
        if not entries:
            raise UpstreamBadResponse("llama-server's /v1/models lists no model")
        return jsonify(_openai_model({**entries[0], "id": model}, fallback.spec, _has_projector(fallback)))
    return jsonify(_routed_model(router.route(model)))


def _local_model(route):
    """The local model behind route (service/llama/pool.py), or None where the gateway does not run it."""
    pool = current_app.extensions.get("model_pool")
    return pool.model_for(route) if pool is not None else None


def _has_projector(route, local=False) -> bool:
    """Whether the gateway gives the route's llama.cpp a projector: one it found, not only one asked for (mmproj =
    "auto" on a repo without one gives none)."""
    local = _local_model(route) if local is False else local
    return local is not None and "--mmproj" in local.supervisor.args


def _fallback_entries(route) -> list:
    """The one llama-server's models with their status; a local model that is not loaded is listed by its name
    without asking llama.cpp (which is not there to ask)."""
    local = _local_model(route)
    if local is not None and local.status != "loaded":
        return [{"id": local.name, "status": local.status}]
    return [{**entry, "status": "loaded"} for entry in _upstream_entries(route.replicas[0].url, record=g.record)]


def _upstream_entries(base_url, record=None) -> list:
    """The data list of a llama-server's /v1/models, checked to be model objects with ids."""
    upstream = get_upstream()
    response = upstream.request("GET", "/v1/models", group="models", base_url=base_url, record=record)
    _, listing = upstream.read_json(response, "/v1/models")
    entries = listing.get("data")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("id") for e in entries):
        raise UpstreamBadResponse("llama-server's /v1/models answer has no list of models with ids")
    return entries


def _routed_model(route) -> dict:
    """A configured model, listed whether or not a replica is up, with its status (loaded, loading, unloaded,
    failed); with what its llama-server tells of it (context size and the like, in meta) once one replica has
    answered."""
    local = _local_model(route)
    status = "loaded" if local is None else local.status
    if route.metadata is None and status == "loaded":
        for replica in route.replicas:
            if replica.ejected:
                continue
            try:
                entries = _upstream_entries(replica.url)
            except UpstreamError:
                continue
            if not entries:
                continue
            # Kept for good: what a model file is does not change while its server runs.
            route.metadata = {key: value for key, value in entries[0].items() if key not in ("id", "aliases")}
            break
    return _openai_model({"created": route.created, **(route.metadata or {}), "id": route.name, "status": status},
                         route.spec, _has_projector(route, local))


def _openai_model(entry: dict, spec=None, vision=False) -> dict:
    """One model with OpenAI's four fields first; llama.cpp's extras (meta: n_ctx, n_params, ...) are kept; then
    what its spec says: its aliases (when it has any), and "capabilities": ["vision"] when vision (a projector)."""
    model = {"id": entry["id"], "object": "model", "created": entry.get("created", 0),
             "owned_by": entry.get("owned_by", "llamacpp")}
    model.update((key, value) for key, value in entry.items() if key not in model)
    if spec is not None and spec.aliases:
        model["aliases"] = list(spec.aliases)
    if vision:
        model["capabilities"] = ["vision"]
    return model
