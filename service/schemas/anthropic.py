"""marshmallow schemas for Anthropic's Messages API: the fields it defines are checked as Anthropic checks them,
so that an Anthropic client gets a 400 naming the field where llama.cpp would answer anyway (or with a 500)."""
from marshmallow import ValidationError, fields, validate

from .fields import INT32_MAX, JsonBoolean, JsonInteger, JsonNumber, OpenSchema, optional

MESSAGE_ROLES = ("user", "assistant")


class Content(fields.Field):
    """A message's content: text, or a list of content blocks (objects with a type)."""

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


class InputMessageSchema(OpenSchema):
    """One input message (Anthropic's name): a role, user or assistant, and its content."""

    role = fields.String(required=True, validate=validate.OneOf(MESSAGE_ROLES))
    content = Content(required=True)


class ToolSchema(OpenSchema):
    """A tool the model may call: a name, and for client tools an input_schema."""

    name = fields.String(required=True, validate=validate.Length(min=1, max=128))
    description = fields.String()
    input_schema = fields.Dict()


class CountTokensSchema(OpenSchema):
    """POST /v1/messages/count_tokens."""

    model = fields.String(required=True, validate=validate.Length(min=1))
    messages = fields.List(fields.Nested(InputMessageSchema), required=True, validate=validate.Length(min=1))
    system = Content()
    tools = fields.List(fields.Nested(ToolSchema))


class MessagesSchema(CountTokensSchema):
    """POST /v1/messages."""

    max_tokens = JsonInteger(required=True, validate=validate.Range(min=1, max=INT32_MAX))
    stream = JsonBoolean()
    temperature = JsonNumber(validate=validate.Range(min=0, max=1))
    top_p = JsonNumber(validate=validate.Range(min=0, max=1))
    top_k = JsonInteger(validate=validate.Range(min=0))
    stop_sequences = fields.List(fields.String())
    metadata = optional(fields.Dict)
