"""GET /openapi.json: an OpenAPI 3 document of the gateway, generated from the marshmallow schemas that
validate its requests (apispec), so that the document cannot drift from the validation."""
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, current_app, jsonify

from .schemas import ChatCompletionSchema, CompletionSchema, EmbeddingSchema, ErrorSchema

bp = Blueprint("openapi", __name__)

# The statuses each kind of route can answer with besides 200, all in the error envelope.
COMMON_ERRORS = ("401", "404", "405", "413", "429", "503")
UPSTREAM_ERRORS = ("499", "501", "502", "504")
BODY_ERRORS = ("400", "415")

ANY_JSON_OBJECT = {"type": "object", "additionalProperties": True}


def _field_openapi(self, field, **kwargs):
    # The gateway's own field classes say what JSON they accept (oneOf string or list, ...).
    return dict(getattr(field, "openapi", {}))


def _errors(statuses) -> dict:
    return {status: {"$ref": "#/components/responses/Error"} for status in statuses}


def _generation(summary, request_schema, streams=True) -> dict:
    content = {"application/json": {"schema": ANY_JSON_OBJECT}}
    if streams:
        # Each event's data: a chunk object, an error object, or the closing [DONE].
        content["text/event-stream"] = {"schema": {"oneOf": [ANY_JSON_OBJECT, {"type": "string", "enum": ["[DONE]"]}]}}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
        "responses": {"200": {"description": "llama-server's answer, passed through", "content": content},
                      **_errors(BODY_ERRORS + COMMON_ERRORS + UPSTREAM_ERRORS)},
    }}


def build_openapi(version: str) -> dict:
    """The OpenAPI 3 document, as a dict."""
    plugin = MarshmallowPlugin()
    spec = APISpec(title="llama.cpp gateway", version=version, openapi_version="3.0.3", plugins=[plugin],
                   info={"description": "An OpenAI-compatible gateway for llama.cpp's llama-server."})
    plugin.converter.add_attribute_function(_field_openapi)
    spec.components.schema("ChatCompletionRequest", schema=ChatCompletionSchema)
    spec.components.schema("CompletionRequest", schema=CompletionSchema)
    spec.components.schema("EmbeddingRequest", schema=EmbeddingSchema)
    spec.components.schema("Error", schema=ErrorSchema)
    spec.components.response("Error", {"description": "An error, in OpenAI's envelope",
                                       "content": {"application/json": {"schema": "Error"}}})
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("apiKey", {"type": "apiKey", "in": "header", "name": "x-api-key"})
    keyed = [{"bearer": []}, {"apiKey": []}]
    spec.path("/v1/chat/completions", operations=_generation("Create a chat completion", "ChatCompletionRequest"))
    spec.path("/v1/completions", operations=_generation("Create a text completion", "CompletionRequest"))
    spec.path("/v1/embeddings", operations=_generation("Embed text or token ids", "EmbeddingRequest", streams=False))
    spec.path("/v1/models", operations={"get": {
        "summary": "List the models", "responses": {
            "200": {"description": "OpenAI's model list", "content": {"application/json": {"schema": {
                "type": "object", "required": ["object", "data"], "properties": {
                    "object": {"type": "string", "enum": ["list"]},
                    "data": {"type": "array", "items": {"type": "object", "required": ["id", "object"]}}}}}}},
            **_errors(COMMON_ERRORS + UPSTREAM_ERRORS)}}})
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
    return document


@bp.get("/openapi.json")
def openapi_document():
    """The gateway's OpenAPI 3 document."""
    return jsonify(current_app.extensions["openapi"])


def init_openapi(app, version):
    """Build the document once for app."""
    app.extensions["openapi"] = build_openapi(version)
