"""GET /health: 200 when llama-server is ready; otherwise 503 in the envelope, saying why."""
import threading

import pytest
from werkzeug import Response

from tests.test_errors import assert_envelope
from tests.test_upstream import LOADING, unused_port_url


@pytest.mark.llama
def test_ok_against_real_llama(llama_client, llama):
    response = llama_client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["upstream"]["url"] == llama.url


def test_loading_is_503_and_not_retried(fake_client, httpserver):
    httpserver.expect_request("/health").respond_with_json(LOADING, status=503)
    response = fake_client.get("/health")
    error = assert_envelope(response, 503)
    assert "Loading model" in error["message"]
    assert response.headers["Retry-After"]
    assert len(httpserver.log) == 1  # health answers at once: no retries


def test_refused_is_503(make_app):
    error = assert_envelope(make_app(unused_port_url()).test_client().get("/health"), 503)
    assert "connection refused" in error["message"]


def test_timed_out_is_503(make_app, httpserver):
    release = threading.Event()
    httpserver.expect_request("/health").respond_with_handler(
        lambda request: release.wait(5) and Response("{}") or Response("{}"))
    client = make_app(httpserver.url_for("").rstrip("/"), MODELS_READ_TIMEOUT_S="0.2").test_client()
    try:
        error = assert_envelope(client.get("/health"), 503)
    finally:
        release.set()
    assert "did not answer" in error["message"]
