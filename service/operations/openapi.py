"""GET /openapi.json: an OpenAPI 3 document of the gateway, generated from the marshmallow schemas that
validate its requests (apispec), so that the document cannot drift from the validation."""
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, current_app, jsonify

from .. import schemas

bp = Blueprint("openapi", __name__)

# The statuses each kind of route can answer with besides 200, all in the error envelope.
COMMON_ERRORS = ("401", "404", "405", "413", "429", "503")
UPSTREAM_ERRORS = ("499", "501", "502", "504")
BODY_ERRORS = ("400", "415")

ANY_JSON_OBJECT = {"type": "object", "additionalProperties": True}


def _field_openapi(self, field, **kwargs):
    # The gateway's own field classes say what JSON they accept (oneOf string or list, ...).
    return dict(getattr(field, "openapi", {}))


def _errors(statuses, envelope="Error") -> dict:
    return {status: {"$ref": f"#/components/responses/{envelope}"} for status in statuses}


# The request bodies, by component name; each family's endpoints and the schema of their body.
REQUEST_SCHEMAS = {
    "ChatCompletionRequest": schemas.ChatCompletionSchema, "CompletionRequest": schemas.CompletionSchema,
    "EmbeddingRequest": schemas.EmbeddingSchema, "ResponseRequest": schemas.ResponseSchema,
    "MessagesRequest": schemas.MessagesSchema, "CountTokensRequest": schemas.CountTokensSchema,
    "RerankRequest": schemas.RerankSchema, "TokenizeRequest": schemas.TokenizeSchema,
    "DetokenizeRequest": schemas.DetokenizeSchema, "ApplyTemplateRequest": schemas.ApplyTemplateSchema,
    "InfillRequest": schemas.InfillSchema,
}

# path: (summary, request component, streams, error envelope)
POST_ENDPOINTS = {
    "/v1/chat/completions": ("Create a chat completion", "ChatCompletionRequest", True, "Error"),
    "/v1/completions": ("Create a text completion", "CompletionRequest", True, "Error"),
    "/v1/embeddings": ("Embed text or token ids", "EmbeddingRequest", False, "Error"),
    "/v1/responses": ("Create a response (OpenAI's Responses API)", "ResponseRequest", True, "Error"),
    "/v1/messages": ("Create a message (Anthropic's Messages API)", "MessagesRequest", True, "AnthropicError"),
    "/v1/messages/count_tokens": ("Count a message's input tokens (Anthropic's API)", "CountTokensRequest", False,
                                  "AnthropicError"),
    "/v1/rerank": ("Rank documents by relevance to a query (llama.cpp)", "RerankRequest", False, "Error"),
    "/tokenize": ("Text to token ids (llama.cpp)", "TokenizeRequest", False, "Error"),
    "/detokenize": ("Token ids to text (llama.cpp)", "DetokenizeRequest", False, "Error"),
    "/apply-template": ("Chat messages to the model's prompt (llama.cpp)", "ApplyTemplateRequest", False, "Error"),
    "/infill": ("Fill in the middle between a prefix and a suffix (llama.cpp)", "InfillRequest", True, "Error"),
}


def _generation(summary, request_schema, streams=True, envelope="Error") -> dict:
    content = {"application/json": {"schema": ANY_JSON_OBJECT}}
    if streams:
        # Each event's data: a chunk object, an error object, or the closing [DONE].
        content["text/event-stream"] = {"schema": {"oneOf": [ANY_JSON_OBJECT, {"type": "string", "enum": ["[DONE]"]}]}}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
        "responses": {"200": {"description": "llama-server's answer, passed through", "content": content},
                      **_errors(BODY_ERRORS + COMMON_ERRORS + UPSTREAM_ERRORS, envelope)},
    }}


def build_openapi(version: str) -> dict:
    """The OpenAPI 3 document, as a dict."""
    plugin = MarshmallowPlugin()
    spec = APISpec(title="llama.cpp gateway", version=version, openapi_version="3.0.3", plugins=[plugin],
                   info={"description": "An OpenAI-compatible gateway for llama.cpp's llama-server."})
    plugin.converter.add_attribute_function(_field_openapi)
    for name, schema in REQUEST_SCHEMAS.items():
        spec.components.schema(name, schema=schema)
    spec.components.schema("Error", schema=schemas.ErrorSchema)
    spec.components.schema("AnthropicError", schema=schemas.AnthropicErrorSchema)
    spec.components.response("Error", {"description": "An error, in OpenAI's envelope",
                                       "content": {"application/json": {"schema": "Error"}}})
    spec.components.response("AnthropicError", {"description": "An error, in Anthropic's envelope",
                                                "content": {"application/json": {"schema": "AnthropicError"}}})
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("apiKey", {"type": "apiKey", "in": "header", "name": "x-api-key"})
    keyed = [{"bearer": []}, {"apiKey": []}]
    for path, (summary, request_schema, streams, envelope) in POST_ENDPOINTS.items():
        spec.path(path, operations=_generation(summary, request_schema, streams, envelope))
    spec.path("/v1/models", operations={"get": {
        "summary": "List the models", "responses": {
            "200": {"description": "OpenAI's model list", "content": {"application/json": {"schema": {
                "type": "object", "required": ["object", "data"], "properties": {
                    "object": {"type": "string", "enum": ["list"]},
                    "data": {"type": "array", "items": {"type": "object", "required": ["id", "object"]}}}}}}},
            **_errors(COMMON_ERRORS + UPSTREAM_ERRORS)}}})
    spec.path("/v1/models/{model}", operations={"get": {
        "summary": "Retrieve a model", "parameters": [
            {"name": "model", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}],
        "responses": {
            "200": {"description": "OpenAI's model object", "content": {"application/json": {"schema": {
                "type": "object", "required": ["id", "object"]}}}},
            **_errors(COMMON_ERRORS + UPSTREAM_ERRORS)}}})
    spec.path("/", operations={"get": {
        "summary": "Say the gateway is here (clients probe it; HEAD too)", "security": [], "responses": {
            "200": {"description": "name, version and where the API is",
                    "content": {"application/json": {"schema": ANY_JSON_OBJECT}}}}}})
    spec.path("/health", operations={"get": {
        "summary": "Whether the gateway can serve", "security": [], "responses": {
            "200": {"description": "ok or degraded", "content": {"application/json": {"schema": ANY_JSON_OBJECT}}},
            "503": {"description": "down: the envelope plus status and upstream",
                    "content": {"application/json": {"schema": "Error"}}}}}})
    spec.path("/metrics", operations={"get": {
        "summary": "Prometheus metrics", "security": [], "responses": {
            "200": {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(("401",))}}})
    document = spec.to_dict()
    document["security"] = keyed
    # What a schema checks across its fields (rerank: documents or texts), which apispec cannot see.
    for name, schema in REQUEST_SCHEMAS.items():
        document["components"]["schemas"][name].update(getattr(schema, "openapi", {}))
    return document


@bp.get("/openapi.json")
def openapi_document():
    """The gateway's OpenAPI 3 document."""
    return jsonify(current_app.extensions["openapi"])


def init_openapi(app, version):
    """Build the document once for app."""
    app.extensions["openapi"] = build_openapi(version)
