"""Every error the gateway produces is JSON in the one OpenAI envelope."""
import pytest

from service.errors import ApiError, error_body, error_type
from tests.clients import assert_openai_envelope


def test_error_body_shape():
    assert error_body(400, "bad", param="messages") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "messages", "code": None}}


@pytest.mark.parametrize("status, kind", [(400, "invalid_request_error"), (401, "authentication_error"),
                                          (404, "not_found_error"), (413, "invalid_request_error"),
                                          (500, "server_error"), (502, "upstream_error"),
                                          (503, "unavailable_error"), (504, "timeout_error")])
def test_status_to_type(status, kind):
    assert error_type(status) == kind


def test_unknown_route_is_404_naming_it(fake_client):
    error = assert_openai_envelope(fake_client.get("/v1/nothing-here"), 404)
    assert "/v1/nothing-here" in error["message"]


def test_wrong_method_is_405_with_allow(fake_client):
    response = fake_client.get("/v1/chat/completions")
    error = assert_openai_envelope(response, 405)
    assert "POST" in error["message"] and "POST" in response.headers["Allow"]


def test_too_large_body_is_413(make_app, httpserver):
    client = make_app(httpserver.url_for("").rstrip("/"), MAX_BODY_BYTES="100").test_client()
    error = assert_openai_envelope(client.post("/v1/embeddings", json={"input": "x" * 200}), 413)
    assert "MAX_BODY_BYTES" in error["message"]
    assert httpserver.log == []


def test_unexpected_exception_is_500_without_traceback(fake_app):
    @fake_app.get("/boom")
    def boom():
        raise RuntimeError("secret internals")

    response = fake_app.test_client().get("/boom")
    error = assert_openai_envelope(response, 500)
    assert "secret internals" not in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)
    assert error["type"] == "server_error"


def test_api_error_carries_headers(fake_app):
    @fake_app.get("/busy")
    def busy():
        raise ApiError("come back later", status=503, headers={"Retry-After": "3"})

    response = fake_app.test_client().get("/busy")
    assert_openai_envelope(response, 503)
    assert response.headers["Retry-After"] == "3"
