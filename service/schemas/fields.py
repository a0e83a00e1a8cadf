"""The JSON field types and the open schema that every family's request schemas are built from."""
from marshmallow import INCLUDE, Schema, ValidationError, fields, validate


class JsonNumber(fields.Float):
    """A JSON number: no strings that look like one, no booleans."""

    def _format_num(self, value):
        if not isinstance(value, (int, float)):
            raise TypeError("not a number")
        return float(value)


class JsonInteger(fields.Integer):
    """A JSON integer: no strings, no booleans, no 1.5."""

    def _format_num(self, value):
        if not isinstance(value, int):
            raise TypeError("not an integer")
        return value


class JsonBoolean(fields.Field):
    """A JSON true or false: not 1, not "true"."""

    openapi = {"type": "boolean"}

    default_error_messages = {"invalid": "Not a valid boolean (true or false)."}

    def _deserialize(self, value, attr, data, **kwargs):
        if value is not True and value is not False:
            raise self.make_error("invalid")
        return value


# llama.cpp keeps token counts in 32-bit integers: a larger one overflows into a negative count.
INT32_MAX = 2**31 - 1


def token_count(minimum=0, **kwargs):
    """An optional count of tokens (null allowed), from minimum to what llama.cpp can hold."""
    return optional(JsonInteger, validate=validate.Range(min=minimum, max=INT32_MAX), **kwargs)


class Rejected(fields.Field):
    """A field llama.cpp cannot honour: any value but null (or the accepted one) is a 400 naming it."""

    def __init__(self, message, accepted=(), **kwargs):
        super().__init__(allow_none=True, **kwargs)
        self.message, self.accepted = message, accepted
        # For the OpenAPI document: only null, or the accepted values, pass.
        self.openapi = ({"type": "boolean", "enum": [*accepted, None], "nullable": True} if accepted
                        else {"type": "string", "enum": [None], "nullable": True})

    def _deserialize(self, value, attr, data, **kwargs):
        if value is None or any(value is accepted for accepted in self.accepted):  # false, never 0
            return value
        raise ValidationError(self.message)


class ContentBlocks(fields.Field):
    """A message's content: text, or a list of content blocks. The block types are the API's to extend, so any
    type passes; what llama.cpp cannot read is refused: a block that is not an object with a type, and a text
    block without its text (llama.cpp answers that with a 500, "key 'text' not found")."""

    openapi = {"oneOf": [{"type": "string"}, {"type": "array", "items": {
        "type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValidationError("Must be a string or a list of content blocks.")
        for index, block in enumerate(value):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise ValidationError({index: ["Must be a content block: an object with a type."]})
            if block["type"] == "text" and not isinstance(block.get("text"), str):
                raise ValidationError({index: {"text": ["A text block needs its text, a string."]}})
        return value


class OpenSchema(Schema):
    """A schema that checks its own fields and lets unknown ones through."""

    class Meta:
        unknown = INCLUDE


def optional(field_class, *args, **kwargs):
    """An optional field that, as in OpenAI's API, may also be null."""
    return field_class(*args, allow_none=True, **kwargs)


def is_token_ids(value) -> bool:
    """True for a non-empty list of integer token ids."""
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and t is not True and t is not False
                                                           for t in value)


TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer"}}
