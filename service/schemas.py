"""marshmallow schemas for the three POST bodies: they check the fields OpenAI defines and let every other
field (llama.cpp's n_predict, grammar, json_schema, samplers, ...) through untouched.

The gateway forwards the client's own bytes, so these schemas only validate; they never rewrite a body.
"""
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


def _is_token_ids(value):
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and t is not True and t is not False
                                                           for t in value)


_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer"}}


class StopSequences(fields.Field):
    """OpenAI's stop: a string or a list of strings."""

    openapi = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            return value
        raise ValidationError("Must be a string or a list of strings.")


class Prompt(fields.Field):
    """A completions prompt: a string, a list of strings, a list of token ids, or a list of those."""

    openapi = {"oneOf": [{"type": "string"}, _TOKEN_IDS,
                         {"type": "array", "minItems": 1, "items": {"oneOf": [{"type": "string"}, _TOKEN_IDS]}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str) or _is_token_ids(value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, str) or _is_token_ids(p) for p in value):
            return value
        raise ValidationError("Must be a string, a list of strings, a list of token ids, or a list of those.")


class EmbeddingInput(fields.Field):
    """Embeddings input: a non-empty string, list of non-empty strings, list of token ids, or list of those."""

    openapi = {"oneOf": [{"type": "string", "minLength": 1}, _TOKEN_IDS,
                         {"type": "array", "minItems": 1,
                          "items": {"oneOf": [{"type": "string", "minLength": 1}, _TOKEN_IDS]}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            if not value:
                raise ValidationError("Must not be an empty string.")
            return value
        if not isinstance(value, list) or not value:
            raise ValidationError("Must be a non-empty string or a non-empty list of strings or token ids.")
        if _is_token_ids(value):
            return value
        for index, item in enumerate(value):
            if not (isinstance(item, str) and item) and not _is_token_ids(item):
                raise ValidationError({index: ["Must be a non-empty string or a non-empty list of token ids."]})
        return value


class OpenSchema(Schema):
    """A schema that checks its own fields and lets unknown ones through."""

    class Meta:
        unknown = INCLUDE


def _optional(field_class, *args, **kwargs):
    """An optional field that, as in OpenAI's API, may also be null."""
    return field_class(*args, allow_none=True, **kwargs)


class MessageSchema(OpenSchema):
    """One chat message: a role and, usually, content."""

    role = fields.String(required=True, validate=validate.Length(min=1))
    content = fields.Raw(allow_none=True)
    name = _optional(fields.String)


class StreamOptionsSchema(OpenSchema):
    """stream_options: include_usage asks for a final usage chunk."""

    include_usage = _optional(JsonBoolean)


class GenerationSchema(OpenSchema):
    """Sampling fields shared by chat and text completions."""

    model = _optional(fields.String)
    stream = _optional(JsonBoolean)
    stream_options = _optional(fields.Nested, StreamOptionsSchema)
    max_tokens = _optional(JsonInteger, validate=validate.Range(min=0))
    temperature = _optional(JsonNumber, validate=validate.Range(min=0))
    top_p = _optional(JsonNumber, validate=validate.Range(min=0, max=1))
    n = _optional(JsonInteger, validate=validate.Range(min=1))
    stop = _optional(StopSequences)
    presence_penalty = _optional(JsonNumber)
    frequency_penalty = _optional(JsonNumber)
    seed = _optional(JsonInteger)
    logit_bias = _optional(fields.Dict)
    user = _optional(fields.String)


class ChatCompletionSchema(GenerationSchema):
    """POST /v1/chat/completions."""

    messages = fields.List(fields.Nested(MessageSchema), required=True, validate=validate.Length(min=1))
    max_completion_tokens = _optional(JsonInteger, validate=validate.Range(min=0))
    logprobs = _optional(JsonBoolean)
    top_logprobs = _optional(JsonInteger, validate=validate.Range(min=0, max=20))
    tools = _optional(fields.List, fields.Dict())
    response_format = _optional(fields.Dict)


class CompletionSchema(GenerationSchema):
    """POST /v1/completions."""

    prompt = Prompt(required=True)
    echo = _optional(JsonBoolean)
    logprobs = _optional(JsonInteger, validate=validate.Range(min=0))
    suffix = _optional(fields.String)


class EmbeddingSchema(OpenSchema):
    """POST /v1/embeddings."""

    input = EmbeddingInput(required=True)
    model = _optional(fields.String)
    encoding_format = _optional(fields.String, validate=validate.OneOf(["float", "base64"]))
    dimensions = _optional(JsonInteger, validate=validate.Range(min=1))
    user = _optional(fields.String)


class ErrorDetailSchema(Schema):
    """The inside of the OpenAI error envelope."""

    message = fields.String(required=True)
    type = fields.String(required=True)
    param = fields.String(required=True, allow_none=True)
    code = fields.String(required=True, allow_none=True)


class ErrorSchema(Schema):
    """Every error the gateway answers: {"error": {"message", "type", "param", "code"}}."""

    error = fields.Nested(ErrorDetailSchema, required=True)


def first_error(errors: dict) -> tuple:
    """Return (param, message) for the first error marshmallow reported, param as messages[0].role."""
    path = []
    node = errors
    while isinstance(node, dict) and node:
        key, node = next(iter(node.items()))
        path.append(key)
    message = node[0] if isinstance(node, list) and node else str(node)
    param = ""
    for key in path:
        if key == "_schema":
            continue
        param += f"[{key}]" if isinstance(key, int) else (f".{key}" if param else str(key))
    return (param or None), message
