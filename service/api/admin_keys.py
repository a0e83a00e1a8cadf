"""/admin/keys: API keys made at run time (issue 23), kept in the database: create (the secret shown once), list,
show, update, rotate (the old secret working for a grace period) and revoke. For ADMIN_API_KEY alone.

The keys of OPENAI_API_KEY/OPENAI_API_KEYS are listed too, read-only (they change in the environment), as
env:CLIENT. Without a database (app.extensions["store"] is None) every route answers 404 store_off: as with the
admin API off (admin_api_disabled), what is not there is a 404, which no SDK resends.
"""
import time

from flask import Blueprint, current_app, jsonify, request

from ..errors import ApiError
from ..policy.auth import KeyRing
from ..schemas.admin_keys import (KeyCreateSchema, KeyFieldsSchema, RotateSchema, environment_key, public_key,
                                  store_fields)
from ..store.errors import KeyNotFound
from ..store.periods import period_end
from .request_body import read_json_body

bp = Blueprint("admin_keys", __name__)
create_schema, update_schema, rotate_schema = KeyCreateSchema(), KeyFieldsSchema(), RotateSchema()
ENV_PREFIX = "env:"


class StoreOff(ApiError):
    """Keys at run time and kept usage asked of a gateway that runs without a database."""

    status = 404
    code = "store_off"

    def __init__(self):
        super().__init__("Keys at run time need DATABASE_URL: this gateway runs without a database (bin/serve "
                         "uses gateway.db in MODELS_DIR unless DATABASE_URL says otherwise)")


class KeyReadOnly(ApiError):
    """A change asked of a key that the environment sets."""

    status = 409
    code = "key_read_only"


class NameOfEnvironmentKey(ApiError):
    """A stored key named as a client of OPENAI_API_KEY/OPENAI_API_KEYS: their requests would be one client's."""

    status = 409
    code = "key_exists"

    def __init__(self, name):
        super().__init__(f"'{name}' is the client id of a key in OPENAI_API_KEY/OPENAI_API_KEYS; choose another "
                         "name", param="name")


def current_store():
    """The app's key and usage store, or 404 store_off when it runs without a database."""
    store = current_app.extensions.get("store")
    if store is None:
        raise StoreOff()
    return store


def environment_clients(settings) -> list:
    """The client ids of the environment's keys (OPENAI_API_KEY's 'default', OPENAI_API_KEYS'), once each."""
    return KeyRing.from_settings(settings).client_ids


def check_name(fields: dict, clients) -> None:
    """Refuse (409) a name the environment's keys already use."""
    if fields.get("name") in clients:
        raise NameOfEnvironmentKey(fields["name"])


def shown_key(store, key, now=None) -> dict:
    """A stored key as the admin API shows it, with its budget's spending in the current period."""
    now = time.time() if now is None else now
    if key.budget_per is None:
        return public_key(key, now)
    return public_key(key, now, store.usage.spent(key.id, key.budget_per, now), period_end(key.budget_per, now))


def _loaded(schema) -> dict:
    _, body = read_json_body(schema)
    return schema.load(body)


def _stored_key(store, key_id):
    if key_id.startswith(ENV_PREFIX) and key_id[len(ENV_PREFIX):] in environment_clients(current_app.config):
        raise KeyReadOnly(f"{key_id} is set by OPENAI_API_KEY/OPENAI_API_KEYS: change it in the environment")
    key = store.keys.get(key_id)
    if key is None:
        raise KeyNotFound(f"No key has the id {key_id!r} (GET /admin/keys lists them)")
    return key


@bp.post("/admin/keys")
def create_key():
    """Make a key; the answer holds its secret, shown this once."""
    store = current_store()
    fields = store_fields(_loaded(create_schema))
    check_name(fields, environment_clients(current_app.config))
    key, secret = store.keys.create(fields.pop("name"), **fields)
    return jsonify({"id": key.id, "key": secret, **shown_key(store, key)}), 201


@bp.get("/admin/keys")
def list_keys():
    """Every stored key (revoked and expired ones too) and then the environment's, read-only; no secret."""
    store = current_store()
    now = time.time()
    overrides = current_app.config.get("RATE_LIMITS") or {}
    stored = [shown_key(store, key, now) for key in store.keys.list()]
    environment = [environment_key(client, overrides.get(client, {}))
                   for client in environment_clients(current_app.config)]
    return jsonify({"object": "list", "data": stored + environment})


@bp.get("/admin/keys/<key_id>")
def show_key(key_id):
    """One key, stored or the environment's."""
    store = current_store()
    if key_id.startswith(ENV_PREFIX) and key_id[len(ENV_PREFIX):] in environment_clients(current_app.config):
        client = key_id[len(ENV_PREFIX):]
        return jsonify(environment_key(client, (current_app.config.get("RATE_LIMITS") or {}).get(client, {})))
    return jsonify(shown_key(store, _stored_key(store, key_id)))


@bp.patch("/admin/keys/<key_id>")
def update_key(key_id):
    """Change any of a key's fields (null clears an optional one); the others stay."""
    store = current_store()
    key = _stored_key(store, key_id)
    fields = store_fields(_loaded(update_schema))
    check_name(fields, environment_clients(current_app.config))
    if fields:
        key = store.keys.update(key_id, **fields)
    return jsonify(shown_key(store, key))


@bp.post("/admin/keys/<key_id>/rotate")
def rotate_key(key_id):
    """A new secret for the key (shown this once); the old one works for grace_s more seconds (default 1 h)."""
    store = current_store()
    _stored_key(store, key_id)
    body = _loaded(rotate_schema) if request.get_data(cache=True).strip() else rotate_schema.load({})
    now = time.time()
    key, secret = store.keys.rotate(key_id, body["grace_s"])
    return jsonify({"id": key.id, "key": secret, "old_key_valid_until": now + body["grace_s"],
                    **shown_key(store, key, now)})


@bp.delete("/admin/keys/<key_id>")
def revoke_key(key_id):
    """Revoke a key: refused from now on, on every gateway of the database within about a second."""
    store = current_store()
    _stored_key(store, key_id)
    return jsonify(shown_key(store, store.keys.revoke(key_id)))
