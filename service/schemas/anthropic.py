"""marshmallow schemas for Anthropic's Messages API: the fields it defines are checked as Anthropic checks them,
so that an Anthropic client gets a 400 naming the field where llama.cpp would answer anyway (or with a 500).

What Anthropic extends from release to release passes: roles, content block types, tool types, and the beta
fields Claude Code sends (thinking, context_management, output_config, ...), which llama.cpp reads or ignores.
"""
from marshmallow import fields, validate

from .fields import INT32_MAX, ContentBlocks, JsonBoolean, JsonInteger, JsonNumber, OpenSchema, optional


class InputMessageSchema(OpenSchema):
    """One input message (Anthropic's name): a role and its content."""

    # Any word: Claude Code 2.1 sends "system" here (the mid-conversation-system beta) and llama.cpp takes it.
    # Only a role that is not a string breaks llama.cpp (a 500, "type must be string").
    role = fields.String(required=True, validate=validate.Length(min=1))
    content = ContentBlocks(required=True)


class ToolSchema(OpenSchema):
    """A tool the model may call: a name, and for client tools an input_schema."""

    name = fields.String(required=True, validate=validate.Length(min=1, max=128))
    description = fields.String()
    input_schema = fields.Dict()


class CountTokensSchema(OpenSchema):
    """POST /v1/messages/count_tokens."""

    model = fields.String(required=True, validate=validate.Length(min=1))
    messages = fields.List(fields.Nested(InputMessageSchema), required=True, validate=validate.Length(min=1))
    system = ContentBlocks()
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
