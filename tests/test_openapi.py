"""The OpenAPI document, and schemathesis fuzzing the app from it: no 5xx from the gateway's own code, every
response as documented, every error in the envelope."""
import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate

from service import create_app
from tests.apps import FAST_SETTINGS


def test_document_is_valid_openapi_and_public(fake_app, make_app, httpserver):
    document = fake_app.test_client().get("/openapi.json").get_json()
    validate(document)
    assert set(document["paths"]) == {
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/models/{model}", "/health",
        "/", "/metrics", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/v1/rerank", "/tokenize",
        "/detokenize", "/apply-template", "/infill"}
    keyed = make_app(httpserver.url_for("").rstrip("/"), OPENAI_API_KEY="k").test_client()
    assert keyed.get("/openapi.json").status_code == 200


def test_document_follows_the_schemas(fake_app):
    # Generated from the marshmallow schemas: the validation's own rules appear in it.
    schemas = fake_app.test_client().get("/openapi.json").get_json()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert chat["required"] == ["messages"]
    assert chat["properties"]["temperature"]["minimum"] == 0
    assert schemas["EmbeddingRequest"]["properties"]["encoding_format"]["enum"][:2] == ["float", "base64"]
    assert schemas["Message"]["required"] == ["role"]


FUZZ_KEY = "fuzz-key"


def _fake_upstream_app():
    """The gateway over a fake llama-server that answers every call well, so a 5xx can only be the gateway's."""
    from pytest_httpserver import HTTPServer

    server = HTTPServer()
    server.start()
    completion = {"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    server.expect_request("/health").respond_with_json({"status": "ok"})
    server.expect_request("/metrics").respond_with_data("llamacpp:requests_deferred 0\n")
    server.expect_request("/v1/models").respond_with_json({"data": [{"id": "m", "object": "model"}]})
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
                 "/v1/messages/count_tokens", "/v1/rerank", "/tokenize", "/detokenize", "/apply-template", "/infill"):
        server.expect_request(path).respond_with_handler(
            lambda request: _answer(request, completion))
    return server, create_app({**FAST_SETTINGS, "LLAMA_SERVER_URL": server.url_for("").rstrip("/"),
                               "OPENAI_API_KEY": FUZZ_KEY})


def _answer(request, completion):
    from werkzeug import Response

    if b'"stream": true' in request.get_data() or b'"stream":true' in request.get_data():
        return Response(b"data: {}\n\ndata: [DONE]\n\n", content_type="text/event-stream")
    return Response(json.dumps(completion), content_type="application/json")


_server, _app = _fake_upstream_app()
schema = schemathesis.openapi.from_wsgi("/openapi.json", _app)


@pytest.fixture(scope="module", autouse=True)
def _stop_fake_upstream():
    yield
    _server.clear()
    _server.stop()


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_fuzzed_requests_get_documented_answers(case):
    response = case.call_and_validate(headers={"Authorization": f"Bearer {FUZZ_KEY}"})
    if response.status_code >= 400:
        body = response.json()
        if case.path.startswith("/v1/messages"):
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}  # Anthropic's envelope
        else:
            assert set(body["error"]) == {"message", "type", "param", "code"}
    assert response.status_code < 500 or response.status_code == 503 and case.path == "/health"
