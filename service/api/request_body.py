"""Read a JSON request body once: the client's bytes to forward, and the parsed object to validate."""
import json

from flask import request

from ..errors import InvalidRequest, UnsupportedMediaType
from ..schemas import first_error


def _reject_constant(name):
    # Python's json accepts NaN and Infinity; JSON and llama.cpp do not.
    raise ValueError(f"{name} is not valid JSON")


def _is_json_type(mimetype: str) -> bool:
    return mimetype == "application/json" or mimetype.endswith("+json")


def read_json_body(schema) -> tuple:
    """Return (raw bytes, parsed dict) of the request body, or raise a 4xx naming what is wrong with it."""
    mimetype = request.mimetype
    if mimetype and not _is_json_type(mimetype):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {mimetype} (with curl: -H 'Content-Type: application/json')")
    raw = request.get_data(cache=False)  # raises 413 past MAX_BODY_BYTES
    if not raw.strip():
        raise InvalidRequest("Request body is empty; send a JSON object")
    try:
        # Strictly UTF-8, as JSON travels (RFC 8259): llama.cpp reads nothing else, and json.loads alone would
        # take UTF-16 or surrogates encoded as bytes.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidRequest(f"Request body is not UTF-8 (byte {error.start}); send JSON in UTF-8") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise InvalidRequest(f"Request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"Request body must be a JSON object, not a JSON {_json_kind(body)}")
    errors = schema.validate(body)
    if errors:
        param, message = first_error(errors)
        raise InvalidRequest(f"Invalid '{param}': {message}" if param else message, param=param)
    return raw, body


def _json_kind(value) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return "number"
