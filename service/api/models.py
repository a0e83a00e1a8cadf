"""GET /v1/models."""
from flask import Blueprint, g, jsonify

from ..errors import UpstreamBadResponse
from ..relay import get_upstream

bp = Blueprint("models", __name__)


@bp.get("/v1/models")
@bp.get("/models")
def list_models():
    """List llama-server's models in OpenAI's shape: {object: list, data: [{id, object, created, owned_by}]}."""
    upstream = get_upstream()
    response = upstream.request("GET", "/v1/models", group="models", record=g.record)
    _, listing = upstream.read_json(response, "/v1/models")
    entries = listing.get("data")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("id") for e in entries):
        raise UpstreamBadResponse("llama-server's /v1/models answer has no list of models with ids")
    # llama.cpp adds an ollama-style "models" list beside "data"; OpenAI clients expect only "data".
    return jsonify({"object": "list", "data": [_openai_model(entry) for entry in entries]})


def _openai_model(entry: dict) -> dict:
    """One model with OpenAI's four fields first; llama.cpp's extras (meta: n_ctx, n_params, ...) are kept."""
    model = {"id": entry["id"], "object": "model", "created": entry.get("created", 0),
             "owned_by": entry.get("owned_by", "llamacpp")}
    model.update((key, value) for key, value in entry.items() if key not in model)
    return model
