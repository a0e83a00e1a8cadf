"""marshmallow schemas for OpenAI's chat, completions and embeddings bodies (the Responses API's is in
responses.py): they check the fields OpenAI defines and let every other field (llama.cpp's n_predict, grammar,
json_schema, samplers, ...) through untouched.

The gateway forwards the client's own bytes, so these schemas only validate; they never rewrite a body.
"""
from marshmallow import ValidationError, fields, validate

from .fields import (TOKEN_IDS, ContentBlocks, JsonBoolean, JsonInteger, JsonNumber, OpenSchema, is_token_ids,
                     optional, token_count)


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


# The tool types llama.cpp's chat serves: it answers any other with a 500 ("Unsupported tool type"), so the gateway
# names the field in a 400 instead. (Its Responses and Messages APIs drop the tools they do not know: no check there.)
CHAT_TOOL_TYPES = ("function",)
TOOL_TYPE_ERROR = "llama.cpp's chat completions serve tools of type function only, not {input}"


class ToolCallFunctionSchema(OpenSchema):
    """The function an assistant's tool call called: its name and arguments, both of which llama.cpp reads."""

    name = fields.String(required=True)
    arguments = fields.Raw(required=True, allow_none=True)


class ToolCallSchema(OpenSchema):
    """One tool call of an assistant message, sent back in the conversation."""

    id = fields.String()
    type = fields.String(required=True, validate=validate.OneOf(CHAT_TOOL_TYPES, error=TOOL_TYPE_ERROR))
    function = fields.Nested(ToolCallFunctionSchema, required=True)


class MessageSchema(OpenSchema):
    """One chat message: a role and, usually, content.

    The role is any word (OpenAI added developer; llama.cpp's chat template reads any); the string fields
    llama.cpp reads must be strings, never null, or it answers a 500 ("type must be string").
    """

    role = fields.String(required=True, validate=validate.Length(min=1))
    content = optional(ContentBlocks)
    name = fields.String()
    tool_call_id = fields.String()
    tool_calls = optional(fields.List, fields.Nested(ToolCallSchema))
    reasoning_content = fields.String()  # llama.cpp's own: an earlier turn's reasoning


class ChatFunctionSchema(OpenSchema):
    """A function tool's function: llama.cpp reads its name and description as strings."""

    name = fields.String(required=True, validate=validate.Length(min=1))
    description = fields.String()


class ChatToolSchema(OpenSchema):
    """A tool the model may call: a function, the one kind llama.cpp's chat serves."""

    type = fields.String(required=True, validate=validate.OneOf(CHAT_TOOL_TYPES, error=TOOL_TYPE_ERROR))
    function = fields.Nested(ChatFunctionSchema, required=True)


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
    tools = optional(fields.List, fields.Nested(ChatToolSchema))
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
    # The two formats llama.cpp writes; it refuses any other itself, this names the field.
    encoding_format = optional(fields.String, validate=validate.OneOf(["float", "base64"]))
    dimensions = optional(JsonInteger, validate=validate.Range(min=1))
    user = optional(fields.String)
