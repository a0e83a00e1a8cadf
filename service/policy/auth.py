"""API keys: which client a request comes from, compared in constant time, never logged or echoed."""
import hashlib
import hmac

from flask import request

from ..errors import ApiError

# The client id of requests when no key is configured (open access).
OPEN_ACCESS_CLIENT = "anonymous"
# The client id of requests made with ADMIN_API_KEY (their log line and metrics say "admin", never the key).
ADMIN_CLIENT = "admin"
MISSING_KEY = "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
INCORRECT_KEY = "Incorrect API key provided"


class Unauthorized(ApiError):
    """No key, or a key the gateway does not know."""

    status = 401
    code = "invalid_api_key"

    def __init__(self, message):
        # The same key is refused again however often it is sent: the SDKs (and Claude Code, which would otherwise
        # try for three minutes) must not resend it.
        super().__init__(message, headers={"WWW-Authenticate": "Bearer", "x-should-retry": "false"})


def derived_client_id(key: str) -> str:
    """A stable client id for a key listed without one: a short hash that reveals nothing of the key."""
    return "key-" + hashlib.sha256(b"llama-gateway client id\0" + key.encode()).hexdigest()[:12]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class AdminKeyRequired(ApiError):
    """A client key on an admin route: the key is valid, but only ADMIN_API_KEY may do this."""

    status = 403
    code = "admin_key_required"

    def __init__(self, message, client=None):
        super().__init__(message)
        self.client = client  # the client the key belongs to, for the request's log line and metrics


class AdminApiOff(ApiError):
    """An admin route while ADMIN_API_KEY is unset: the admin API is off, as if its routes did not exist."""

    status = 404
    code = "admin_api_disabled"

    def __init__(self):
        super().__init__(f"The admin API is off: set ADMIN_API_KEY to use {request.method} {request.path}")


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
        raise Unauthorized(MISSING_KEY)
    client = keyring.client_for(key)
    if client is None:
        raise Unauthorized(INCORRECT_KEY)
    return client


def admin_keyring(settings):
    """A ring holding only ADMIN_API_KEY (client 'admin'), or None while it is unset (the admin API is off)."""
    key = settings["ADMIN_API_KEY"]
    return KeyRing([(key, ADMIN_CLIENT)]) if key else None


def authenticate_admin(admin_ring, client_of, guard=None, address=None) -> str:
    """Return 'admin' for a request carrying ADMIN_API_KEY; else raise 404 while the admin API is off, 401 without
    a key or with one the gateway does not know, 403 with a client's key (client_of(key) -> its client id, or None;
    a KeyRing will do). guard (admin_guard.AdminGuard) counts wrong keys per address and refuses (429) a guesser."""
    if admin_ring is None:
        raise AdminApiOff()
    key = presented_key()
    if key is None:
        raise Unauthorized("Missing admin API key: send ADMIN_API_KEY as 'Authorization: Bearer <key>' or "
                           "'x-api-key: <key>'")
    if guard is not None:
        guard.check(address)
    if admin_ring.client_for(key) is not None:
        if guard is not None:
            guard.succeeded(address)
        return ADMIN_CLIENT
    client = (client_of.client_for if isinstance(client_of, KeyRing) else client_of)(key)
    if client is not None:
        raise AdminKeyRequired("This route needs the admin key (ADMIN_API_KEY); a client's API key may not use it",
                               client=client)
    if guard is not None:
        guard.failed(address)
    raise Unauthorized(INCORRECT_KEY)
