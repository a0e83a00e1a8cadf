"""API keys: which client a request comes from, compared in constant time, never logged or echoed."""
import hashlib
import hmac

from flask import request

from ..errors import ApiError

# The client id of requests when no key is configured (open access).
OPEN_ACCESS_CLIENT = "anonymous"


class Unauthorized(ApiError):
    """No key, or a key the gateway does not know."""

    status = 401
    code = "invalid_api_key"

    def __init__(self, message):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


def derived_client_id(key: str) -> str:
    """A stable client id for a key listed without one: a short hash that reveals nothing of the key."""
    return "key-" + hashlib.sha256(b"llama-gateway client id\0" + key.encode()).hexdigest()[:12]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyRing:
    """The configured keys and their client ids."""

    def __init__(self, pairs):
        # Only digests are kept: equal-length values for compare_digest, and no key in memory dumps of the app.
        self._entries = [(_digest(key), client or derived_client_id(key)) for key, client in pairs]

    @classmethod
    def from_settings(cls, settings):
        """Build the ring from OPENAI_API_KEY (client 'default') and OPENAI_API_KEYS."""
        pairs = list(settings["OPENAI_API_KEYS"] or ())
        if settings["OPENAI_API_KEY"]:
            pairs.insert(0, (settings["OPENAI_API_KEY"], "default"))
        return cls(pairs)

    @property
    def open_access(self) -> bool:
        """True when no key is configured: every request is let in."""
        return not self._entries

    @property
    def client_ids(self) -> list:
        """Every configured client id, once each."""
        return list(dict.fromkeys(client for _, client in self._entries))

    def client_for(self, key: str):
        """The client id of key, or None; every entry is compared, so timing tells nothing about which matched."""
        digest = _digest(key)
        found = None
        for stored, client in self._entries:
            if hmac.compare_digest(digest, stored):
                found = client
        return found


def presented_key():
    """The key the request carries: Authorization: Bearer <key> (the SDK's way) or x-api-key; None if neither."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key:
        return key
    return request.headers.get("x-api-key")


def authenticate(keyring: KeyRing) -> str:
    """Return the request's client id, or raise Unauthorized (401) saying what is missing."""
    if keyring.open_access:
        return OPEN_ACCESS_CLIENT
    key = presented_key()
    if key is None:
        raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
    client = keyring.client_for(key)
    if client is None:
        raise Unauthorized("Incorrect API key provided")
    return client
