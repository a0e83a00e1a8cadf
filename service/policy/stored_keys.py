"""Keys kept in the database (service/store): who a request is when its key is not one of the environment's.

The environment's keys (OPENAI_API_KEY, OPENAI_API_KEYS) are looked up first and work exactly as before; a key
they do not know is looked up in the store's cache (no database on the hot path for a key it has seen). A
request with a stored key is its key's client (the key's name), and carries the key (g.stored_key) for its
limits, budget and models.
"""
from datetime import datetime, timezone

from .auth import INCORRECT_KEY, MISSING_KEY, OPEN_ACCESS_CLIENT, Unauthorized, presented_key
from ..store.key_cache import SECRET_PREFIX

REVOKED = "This API key was revoked"


def iso_utc(epoch: float) -> str:
    """An epoch time as ISO-8601 UTC to the second, e.g. 2025-07-01T00:00:00Z."""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def has_stored_keys(store) -> bool:
    """Whether the store holds any key, revoked ones included (from its cache: no database call)."""
    return store is not None and bool(store.keys.cache.by_id)


def open_access(keyring, store) -> bool:
    """True while no key is configured anywhere: neither in the environment nor in the store. A key revoked still
    counts: revoking the last key must not open the gateway to everyone."""
    return keyring.open_access and not has_stored_keys(store)


def stored_key_for(secret: str, store, now=None):
    """The usable StoredKey of secret, or None where the store does not know it; 401 saying so for a key revoked
    or expired. The store raises StoreUnavailable (503) for a key not in its cache while the database is down
    and DATABASE_FAILURE is closed."""
    if store is None:
        return None
    key = store.keys.lookup(secret)
    if key is None:
        return None
    now = store.clock() if now is None else now
    if key.revoked_at is not None:
        raise Unauthorized(REVOKED)
    if key.expires_at is not None and now >= key.expires_at:
        raise Unauthorized(f"This API key expired at {iso_utc(key.expires_at)}")
    return key


def authenticate_client(keyring, store) -> tuple:
    """(client id, StoredKey or None) of the request; raise Unauthorized (401) saying what is wrong with its key."""
    if open_access(keyring, store):
        return OPEN_ACCESS_CLIENT, None
    secret = presented_key()
    if secret is None:
        raise Unauthorized(MISSING_KEY)
    # A key made at run time looks like one (sk-gw-...): the store first, the configured keys only if it says no;
    # any other key is the configured keys' (the store knows none of them).
    key = stored_key_for(secret, store) if secret.startswith(SECRET_PREFIX) else None
    if key is None:
        client = keyring.client_for(secret)
        if client is not None:
            return client, None
        raise Unauthorized(INCORRECT_KEY)
    return key.name, key


def client_of_key(keyring, store):
    """A function key -> the client id it belongs to (environment or store, usable or not), or None: who tried a
    client's key on an admin route. It never answers 503: a database that is down makes it None."""
    def client_of(secret):
        client = keyring.client_for(secret)
        if client is not None or store is None:
            return client
        from ..store.errors import StoreUnavailable  # only gateways with a store get here

        try:
            key = store.keys.lookup(secret)
        except StoreUnavailable:  # the admin routes work without the database: an unknown key then
            return None
        return key.name if key is not None else None
    return client_of
