"""marshmallow schemas for OpenAI's POST bodies: they check the fields OpenAI defines and let every other
field (llama.cpp's n_predict, grammar, json_schema, samplers, ...) through untouched.

The gateway forwards the client's own bytes, so these schemas only validate; they never rewrite a body.
"""
from marshmallow import ValidationError, fields, validate, validates_schema

from .fields import (TOKEN_IDS, JsonBoolean, JsonInteger, JsonNumber, OpenSchema, Rejected, is_token_ids, optional,
                     token_count)


class StopSequences(fields.Field):
    """OpenAI's stop: a string or a list of strings."""

    openapi = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            return value
        raise ValidationError("Must be a string or a list of strings.")


class Prompt(fields.Field):
    """A completions prompt: a string, a list of strings, a list of token ids, or a list of those."""

    openapi = {"oneOf": [{"type": "string"}, TOKEN_IDS,
                         {"type": "array", "minItems": 1, "items": {"oneOf": [{"type": "string"}, TOKEN_IDS]}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str) or is_token_ids(value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, str) or is_token_ids(p) for p in value):
            return value
        raise ValidationError("Must be a string, a list of strings, a list of token ids, or a list of those.")


class EmbeddingInput(fields.Field):
    """Embeddings input: a non-empty string, list of non-empty strings, list of token ids, or list of those."""

    openapi = {"oneOf": [{"type": "string", "minLength": 1}, TOKEN_IDS,
                         {"type": "array", "minItems": 1,
                          "items": {"oneOf": [{"type": "string", "minLength": 1}, TOKEN_IDS]}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            if not value:
                raise ValidationError("Must not be an empty string.")
            return value
        if not isinstance(value, list) or not value:
            raise ValidationError("Must be a non-empty string or a non-empty list of strings or token ids.")
        if is_token_ids(value):
            return value
        for index, item in enumerate(value):
            if not (isinstance(item, str) and item) and not is_token_ids(item):
                raise ValidationError({index: ["Must be a non-empty string or a non-empty list of token ids."]})
        return value


# The roles of OpenAI's chat messages; llama.cpp would take any other word as a role and answer.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class MessageSchema(OpenSchema):
    """One chat message: a role and, usually, content."""

    role = fields.String(required=True, validate=validate.OneOf(CHAT_ROLES))
    content = fields.Raw(allow_none=True)
    name = optional(fields.String)


class StreamOptionsSchema(OpenSchema):
    """stream_options: include_usage asks for a final usage chunk."""

    include_usage = optional(JsonBoolean)


class GenerationSchema(OpenSchema):
    """Sampling fields shared by chat and text completions."""

    model = optional(fields.String)
    stream = optional(JsonBoolean)
    stream_options = optional(fields.Nested, StreamOptionsSchema)
    max_tokens = token_count()
    temperature = optional(JsonNumber, validate=validate.Range(min=0))
    top_p = optional(JsonNumber, validate=validate.Range(min=0, max=1))
    # llama.cpp answers one choice per request.
    n = optional(JsonInteger, validate=validate.Equal(1, error="llama.cpp generates one choice per request; n must "
                                                               "be 1 (send n requests for n choices)"))
    stop = optional(StopSequences)
    presence_penalty = optional(JsonNumber)
    frequency_penalty = optional(JsonNumber)
    seed = optional(JsonInteger)
    logit_bias = optional(fields.Dict)
    user = optional(fields.String)


class ChatCompletionSchema(GenerationSchema):
    """POST /v1/chat/completions."""

    messages = fields.List(fields.Nested(MessageSchema), required=True, validate=validate.Length(min=1))
    max_completion_tokens = token_count()
    logprobs = optional(JsonBoolean)
    top_logprobs = optional(JsonInteger, validate=validate.Range(min=0, max=20))
    tools = optional(fields.List, fields.Dict())
    response_format = optional(fields.Dict)


class CompletionSchema(GenerationSchema):
    """POST /v1/completions."""

    prompt = Prompt(required=True)
    echo = optional(JsonBoolean)
    logprobs = optional(JsonInteger, validate=validate.Range(min=0))
    suffix = optional(fields.String)


class EmbeddingSchema(OpenSchema):
    """POST /v1/embeddings."""

    input = EmbeddingInput(required=True)
    model = optional(fields.String)
    encoding_format = optional(fields.String, validate=validate.OneOf(["float", "base64"]))
    dimensions = optional(JsonInteger, validate=validate.Range(min=1))
    user = optional(fields.String)


RESPONSE_ROLES = ("system", "developer", "user", "assistant")


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
            if "role" in item and item["role"] not in RESPONSE_ROLES:
                raise ValidationError({index: {"role": [f"Must be one of: {', '.join(RESPONSE_ROLES)}."]}})
        return value


class FunctionToolSchema(OpenSchema):
    """A tool of the Responses API; a function tool needs its name (llama.cpp answers a 500 without one)."""

    type = fields.String(required=True)
    name = fields.String(validate=validate.Length(min=1))

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
    tools = optional(fields.List, fields.Nested(FunctionToolSchema))
    # llama.cpp keeps no responses: nothing to continue from, nothing to store.
    previous_response_id = Rejected("llama.cpp does not support 'previous_response_id': it keeps no responses; "
                                    "send the whole conversation as input")
    conversation = Rejected("llama.cpp does not support 'conversation': it keeps no conversations; send the whole "
                            "conversation as input")
    store = Rejected("llama.cpp does not store responses: send store false, or leave it out", accepted=(False,))
