"""Requests for a local model that is not loaded: they wait for its load (a stream with SSE comments meanwhile),
and a failed load answers in the client's own API family."""
import json
import threading

import pytest

from service import create_app
from service.llama.pool import ModelPool
from service.llama.pooled_model import PooledModel
from service.proxy import relay
from tests.apps import FAST_SETTINGS
from tests.fakes import CHAT_ANSWER, FakeSupervisor

STREAM = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'


@pytest.fixture
def pooled(httpserver):
    """An app routing model "m" to a local llama.cpp (the fake upstream) that the pool loads on demand."""
    supervisor = FakeSupervisor(httpserver.url_for("").rstrip("/"))
    pool = ModelPool([PooledModel("m", supervisor)], max_loaded=1, load_timeout_s=5)
    app = create_app({**FAST_SETTINGS, "MODEL_UPSTREAMS": f"m={supervisor.url}", "TESTING": True}, pool=pool)
    yield app, pool, supervisor
    app.extensions["upstream"].close()


def test_a_request_waits_for_the_load_and_the_model_is_released_after(pooled, httpserver):
    app, pool, supervisor = pooled
    httpserver.expect_request("/v1/chat/completions").respond_with_json(CHAT_ANSWER)
    response = app.test_client().post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200 and response.get_json()["model"] == "m"
    response.close()  # as a server does once the body is sent
    assert supervisor.starts == 1 and pool.statuses() == {"m": "loaded"}
    assert pool.models["m"].running == 0  # the hold was released with the answer


def test_a_stream_gets_sse_comments_while_its_model_loads(pooled, httpserver, monkeypatch):
    app, pool, supervisor = pooled
    monkeypatch.setattr(relay, "WAIT_KEEPALIVE_S", 0.05)
    supervisor.gate = threading.Event()
    httpserver.expect_request("/v1/chat/completions").respond_with_data(STREAM, content_type="text/event-stream")
    response = app.test_client().post("/v1/chat/completions", buffered=False,
                                      json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    chunks = response.response
    assert next(chunks) == relay.WAITING_COMMENT  # sent while the load lasts
    assert next(chunks) == relay.WAITING_COMMENT
    supervisor.gate.set()
    rest = b"".join(chunks)
    response.close()
    assert rest.replace(relay.WAITING_COMMENT, b"").startswith(b'data: {"choices"') and b"[DONE]" in rest
    assert pool.models["m"].running == 0 and pool.models["m"].waiting == 0


def test_a_stream_whose_load_fails_ends_with_the_familys_error_event(pooled, monkeypatch):
    app, pool, supervisor = pooled
    monkeypatch.setattr(relay, "WAIT_KEEPALIVE_S", 0.05)
    supervisor.gate = threading.Event()
    supervisor.fail_with = "llama.cpp exited with code 1 while starting; its last lines:\nbad magic"
    response = app.test_client().post("/v1/messages", buffered=False, headers={"anthropic-version": "2023-06-01"},
                                      json={"model": "m", "max_tokens": 5, "stream": True,
                                            "messages": [{"role": "user", "content": "hi"}]})
    assert next(response.response) == relay.WAITING_COMMENT
    supervisor.gate.set()
    rest = b"".join(response.response).replace(relay.WAITING_COMMENT, b"")
    response.close()
    assert rest.startswith(b"event: error\n")
    error = json.loads(rest.split(b"data: ", 1)[1])
    assert error["type"] == "error" and "bad magic" in error["error"]["message"]
    assert pool.models["m"].waiting == 0


def test_a_failed_load_is_503_model_load_failed_in_the_envelope(pooled):
    app, pool, supervisor = pooled
    supervisor.fail_with = "llama.cpp exited with code 1 while starting; its last lines:\nbad magic"
    response = app.test_client().post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503 and response.headers["Retry-After"]
    error = response.get_json()["error"]
    assert error["code"] == "model_load_failed" and "bad magic" in error["message"]
    again = app.test_client().post("/v1/embeddings", json={"model": "m", "input": "x"})
    assert again.status_code == 503 and supervisor.starts == 1  # within the backoff: no second load
    health = app.test_client().get("/health")
    replica = health.get_json()["models"]["m"]["replicas"][0]
    assert health.status_code == 503 and replica["status"] == "failed"
    assert "bad magic" not in health.get_data(as_text=True)  # public: llama.cpp's words (file paths) stay out


def test_models_and_health_show_an_unloaded_model_without_asking_for_it(pooled, httpserver):
    app, pool, supervisor = pooled
    client = app.test_client()
    [model] = client.get("/v1/models").get_json()["data"]
    assert (model["id"], model["status"]) == ("m", "unloaded")
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["models"]["m"]["replicas"][0]["status"] == "unloaded"
    assert supervisor.starts == 0 and not httpserver.log  # nothing was loaded or asked to see
