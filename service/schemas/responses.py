"""marshmallow schema for OpenAI's Responses API (POST /v1/responses), as llama.cpp serves it.

OpenAI adds item and tool types often (Codex CLI sends message items with ids, a namespace tool, web_search):
llama.cpp answers the items it cannot read with its own 400 and drops the tools it does not know, so the gateway
checks types only where llama.cpp would answer a 500, and what llama.cpp cannot honour (stored responses).
"""
from marshmallow import ValidationError, fields, validate, validates_schema

from .fields import JsonBoolean, JsonNumber, OpenSchema, Rejected, optional, token_count


class ResponseInput(fields.Field):
    """The Responses API's input: text, or a non-empty list of input items (messages and the like)."""

    openapi = {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "object"}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValidationError("Must be a string or a non-empty list of input items.")
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise ValidationError({index: ["Must be an input item (an object)."]})
            # Any role word passes (OpenAI's to extend); one that is not a word is a mistake in any API.
            if "role" in item and not isinstance(item["role"], str):
                raise ValidationError({index: {"role": ["Not a valid string."]}})
        return value


class ResponseToolSchema(OpenSchema):
    """A tool of the Responses API, of any type; a function tool needs its name and, if described, a string
    description (llama.cpp answers a 500 otherwise)."""

    type = fields.String(required=True)
    name = fields.String(validate=validate.Length(min=1))
    description = fields.String()

    @validates_schema
    def _function_has_a_name(self, data, **kwargs):
        if data.get("type") == "function" and "name" not in data:
            raise ValidationError("A function tool needs its name.", "name")


class ResponseSchema(OpenSchema):
    """POST /v1/responses."""

    model = optional(fields.String)
    input = ResponseInput(required=True)
    instructions = optional(fields.String)
    stream = optional(JsonBoolean)
    max_output_tokens = token_count(minimum=1)
    temperature = optional(JsonNumber, validate=validate.Range(min=0, max=2))
    top_p = optional(JsonNumber, validate=validate.Range(min=0, max=1))
    tools = optional(fields.List, fields.Nested(ResponseToolSchema))
    # llama.cpp keeps no responses: nothing to continue from, nothing to store.
    previous_response_id = Rejected("llama.cpp does not support 'previous_response_id': it keeps no responses; "
                                    "send the whole conversation as input")
    conversation = Rejected("llama.cpp does not support 'conversation': it keeps no conversations; send the whole "
                            "conversation as input")
    store = Rejected("llama.cpp does not store responses: send store false, or leave it out", accepted=(False,))
