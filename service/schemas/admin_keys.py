"""marshmallow schemas of the key admin API's bodies and queries (POST/PATCH /admin/keys, rotate, GET /admin/usage),
shared with bin/keys, and the keys' public JSON: never a secret, a stored key's prefix only."""
import math
import re
import time
from datetime import datetime, timezone

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from .fields import INT32_MAX, JsonInteger, JsonNumber, optional

# A key's name is the client id of its requests (logs, metrics, limits): the same characters OPENAI_API_KEYS allows.
KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")  # \Z: Regexp only matches from the start
# Client ids the gateway gives itself: the admin key's, and every request's while no key is configured.
RESERVED_NAMES = ("admin", "anonymous")
PERIODS = ("day", "month")
GROUPS = ("hour", "day", "month")
FORMATS = ("json", "csv")
MAX_GRACE_S = 30 * 86400
# The database's columns: limits are 32-bit (INTEGER), budgets 64-bit (BIGINT); a larger number is a 400 here.
INT64_MAX = 2**63 - 1
# The first and last seconds ISO-8601 can write (0001-01-01T00:00:00Z, 9999-12-31T23:59:59Z).
FIRST_MOMENT, LAST_MOMENT = -62135596800, 253402300799
# The key fields that null clears (each one then falls back to the gateway's default: all models, RATE_LIMIT_*).
LIMIT_FIELDS = ("rpm", "tpm", "concurrent", "weight")


def moment(value) -> float:
    """Epoch seconds from epoch seconds (a number, or its text) or ISO-8601 (a date, or a time; UTC unless it
    says otherwise); raise ValueError naming both forms."""
    if isinstance(value, bool):
        raise ValueError("not a time")
    if isinstance(value, (int, float)):
        return _in_range(value)
    text = str(value).strip()
    try:
        epoch = float(text)
    except ValueError:
        epoch = None
    if epoch is not None:
        return _in_range(epoch)
    try:
        when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise ValueError(f"{text!r} is neither epoch seconds nor ISO-8601 (2025-06-01 or 2025-06-01T12:00:00Z)") \
            from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _in_range(epoch) -> float:
    # Checked before float(): a JSON integer too large for a float would else raise OverflowError.
    if not (isinstance(epoch, int) or math.isfinite(epoch)) or not FIRST_MOMENT <= epoch <= LAST_MOMENT:
        raise ValueError("Is out of range: a time is from 0001-01-01 to 9999-12-31T23:59:59Z "
                         f"(epoch seconds {FIRST_MOMENT} to {LAST_MOMENT}).")
    return float(epoch)


def iso(epoch) -> str:
    """Epoch seconds as ISO-8601 UTC (2025-06-01T12:00:00Z), or None."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Moment(fields.Field):
    """A time: epoch seconds or ISO-8601."""

    openapi = {"oneOf": [{"type": "number"}, {"type": "string", "format": "date-time"}]}

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            return moment(value)
        except ValueError as error:
            raise ValidationError(str(error)) from None


def _future(value):
    if value is not None and value <= time.time():
        raise ValidationError("Is in the past; to end a key now, revoke it (DELETE /admin/keys/ID).")


NAME_RULES = [validate.Regexp(KEY_NAME, error="Must be 1-64 of A-Z a-z 0-9 . _ - (it is the client id of the key's "
                                            "requests)."),
              validate.NoneOf(RESERVED_NAMES, error="Is the gateway's own client id; choose another name.")]


class BudgetSchema(Schema):
    """{"tokens": N, "requests": N, "per": "day"|"month"}: at least one count; both count the same period."""

    class Meta:
        unknown = RAISE

    tokens = optional(JsonInteger, validate=validate.Range(min=1, max=INT64_MAX))
    requests = optional(JsonInteger, validate=validate.Range(min=1, max=INT64_MAX))
    per = fields.String(required=True, validate=validate.OneOf(PERIODS))

    @validates_schema
    def _counts_something(self, data, **kwargs):
        if data.get("tokens") is None and data.get("requests") is None:
            raise ValidationError("A budget needs tokens or requests (or both).", field_name="tokens")


class KeyFieldsSchema(Schema):
    """Every field of a key that its owner may set; unknown fields are refused (a typo would else be a no-op)."""

    class Meta:
        unknown = RAISE

    name = fields.String(validate=NAME_RULES)
    models = fields.List(fields.String(validate=validate.Length(min=1)), allow_none=True,
                         validate=validate.Length(min=1, error="Must name at least one model (null: every model)."))
    rpm = optional(JsonInteger, validate=validate.Range(min=0, max=INT32_MAX))
    tpm = optional(JsonInteger, validate=validate.Range(min=0, max=INT32_MAX))
    concurrent = optional(JsonInteger, validate=validate.Range(min=0, max=INT32_MAX))
    weight = optional(JsonInteger, validate=validate.Range(min=1, max=INT32_MAX))
    budget = fields.Nested(BudgetSchema, allow_none=True)
    expires_at = Moment(allow_none=True, validate=_future)


class KeyCreateSchema(KeyFieldsSchema):
    """POST /admin/keys: every field but name optional."""

    name = fields.String(required=True, validate=NAME_RULES)


class RotateSchema(Schema):
    """POST /admin/keys/ID/rotate: how long the old secret keeps working."""

    class Meta:
        unknown = RAISE

    grace_s = JsonNumber(load_default=3600.0, validate=validate.Range(min=0, max=MAX_GRACE_S))


class UsageQuerySchema(Schema):
    """GET /admin/usage's query: a time range (default the last 24 h), the grouping, filters, the format."""

    class Meta:
        unknown = RAISE

    start = Moment(data_key="from")
    end = Moment(data_key="to")
    group_by = fields.String(load_default="hour", validate=validate.OneOf(GROUPS))
    key = fields.String(validate=validate.Length(min=1))
    model = fields.String(validate=validate.Length(min=1))
    format = fields.String(validate=validate.OneOf(FORMATS))


def store_fields(body: dict) -> dict:
    """A loaded body as KeyStore.create/update keyword arguments: only the fields the body names (null clears one),
    the budget as its three columns."""
    fields_ = {name: body[name] for name in ("name", *LIMIT_FIELDS, "expires_at") if name in body}
    if "models" in body:
        fields_["models"] = None if body["models"] is None else tuple(dict.fromkeys(body["models"]))
    if "budget" in body:
        budget = body["budget"] or {}
        fields_.update(budget_tokens=budget.get("tokens"), budget_requests=budget.get("requests"),
                       budget_per=budget.get("per"))
    return fields_


def key_status(key, now) -> str:
    """active, expired or revoked."""
    if key.revoked_at is not None:
        return "revoked"
    return "active" if key.usable(now) else "expired"


def public_key(key, now, spent=None, resets_at=None) -> dict:
    """A stored key as the admin API shows it: no secret, its prefix only; spent: (tokens, requests) of the
    budget's current period."""
    budget = None
    if key.budget_per is not None:
        budget = {"tokens": key.budget_tokens, "requests": key.budget_requests, "per": key.budget_per}
        if spent is not None:
            budget.update(spent_tokens=spent[0], spent_requests=spent[1], resets_at=resets_at)
    return {"id": key.id, "object": "api_key", "name": key.name, "prefix": key.prefix,
            "models": None if key.models is None else list(key.models),
            **{name: getattr(key, name) for name in LIMIT_FIELDS}, "budget": budget,
            "expires_at": key.expires_at, "revoked_at": key.revoked_at, "created_at": key.created_at,
            "status": key_status(key, now), "source": "database", "read_only": False}


def environment_key(client: str, limits: dict) -> dict:
    """A key of OPENAI_API_KEY/OPENAI_API_KEYS as the admin API shows it: its client id and RATE_LIMITS override,
    read-only (it changes in the environment), neither its secret nor any part of it."""
    return {"id": f"env:{client}", "object": "api_key", "name": client, "prefix": None, "models": None,
            **{name: limits.get(name) for name in LIMIT_FIELDS}, "budget": None, "expires_at": None,
            "revoked_at": None, "created_at": None, "status": "active", "source": "environment", "read_only": True}


def key_reference(keys, clients, text: str) -> str:
    """The usage key meant by text: a stored key's id or name, env:CLIENT, or an environment key's client id
    (as env:CLIENT); anything else as given (it matches no usage)."""
    if text.startswith("env:") or keys.get(text) is not None:
        return text
    named = next((key.id for key in keys.list() if key.name == text), None)
    if named is not None:
        return named
    return f"env:{text}" if text in clients else text
