"""The models a stored key may use: its models list names a model by its id or one of its aliases; a key without
a list (None) may use every model, as the environment's keys do."""
from flask import g

from ..errors import ApiError


class ModelNotAllowed(ApiError):
    """The key may not use this model."""

    status = 403
    code = "model_not_allowed"

    def __init__(self, model, allowed):
        listed = ", ".join(allowed) if allowed else "none"
        super().__init__(f"This API key may not use the model '{model}'; it may use: {listed}", param="model")


def route_names(route, requested=None) -> set:
    """Every name of route's model (its route name, its id, its aliases); behind the one llama-server that takes
    any name (route.name None), the name the client sent too."""
    names = {route.name} if route.name is not None else {requested}
    if route.spec is not None:
        names.update(route.spec.names())
    names.discard(None)
    return names


def key_allows(key, route, requested=None) -> bool:
    """Whether key (a StoredKey, or None for the environment's keys) may use route's model."""
    if key is None or key.models is None:
        return True
    return not route_names(route, requested).isdisjoint(key.models)


def check_model_allowed(route, requested=None):
    """Raise ModelNotAllowed (403) when the request's stored key (g.stored_key) may not use route's model;
    requested: the name the client sent (shown, and the name behind the one any-name llama-server)."""
    key = g.get("stored_key")
    if not key_allows(key, route, requested):
        shown = requested or route.name or (route.spec.id if route.spec is not None else "")
        raise ModelNotAllowed(shown, key.models)
