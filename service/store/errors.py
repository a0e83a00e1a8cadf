"""The store's errors: StoreError stops the gateway at start; the others are answers (ApiError) to admin calls."""
from ..errors import ApiError


class StoreError(Exception):
    """The database cannot be used at all (unreachable at start, or at a schema newer than this gateway's)."""


class KeyNotFound(ApiError):
    """No stored key has this id."""

    status = 404
    code = "key_not_found"


class KeyNameTaken(ApiError):
    """Another stored key already has this name."""

    status = 409
    code = "key_exists"


class StoreUnavailable(ApiError):
    """The database cannot be reached now; the gateway retries it every second."""

    status = 503
    code = "database_unavailable"

    def __init__(self, message="The key database cannot be reached; retry in a few seconds"):
        super().__init__(message, headers={"Retry-After": "5"})
