"""The error envelope's schema (for the OpenAPI document) and how a validation error is named to the client."""
from marshmallow import Schema, fields


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


class AnthropicErrorDetailSchema(Schema):
    """The inside of Anthropic's error envelope."""

    type = fields.String(required=True)
    message = fields.String(required=True)


class AnthropicErrorSchema(Schema):
    """Every error on Anthropic's routes: {"type": "error", "error": {"type", "message"}}."""

    type = fields.String(required=True)
    error = fields.Nested(AnthropicErrorDetailSchema, required=True)
