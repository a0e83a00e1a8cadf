"""GET /v1/models: llama-server's list in OpenAI's shape."""
import pytest

from tests.apps import routed_app
from tests.clients import assert_openai_envelope
from tests.fakes import unused_port_url


@pytest.mark.llama
def test_lists_the_real_model_in_openai_shape(llama_client):
    response = llama_client.get("/v1/models")
    assert response.status_code == 200
    listing = response.get_json()
    assert set(listing) == {"object", "data"}
    assert listing["object"] == "list"
    [model] = listing["data"]
    assert list(model)[:4] == ["id", "object", "created", "owned_by"]
    assert model["id"] == "demo"  # the file name, not its path
    assert model["object"] == "model"
    assert isinstance(model["created"], int)
    assert model["owned_by"] == "llamacpp"
    assert model["meta"]["n_ctx"] > 0  # llama.cpp's extras are kept


def test_also_served_without_the_v1_prefix(fake_client, httpserver):
    httpserver.expect_request("/v1/models").respond_with_json({"data": [{"id": "m"}]})
    listing = fake_client.get("/models").get_json()
    assert listing == {"object": "list", "data": [{"id": "m", "object": "model", "created": 0,
                                                   "owned_by": "llamacpp", "status": "loaded"}]}


@pytest.mark.parametrize("answer", [{"data": "nope"}, {"models": []}, {"data": [{"name": "no id"}]}])
def test_a_listing_without_models_is_502(fake_client, httpserver, answer):
    httpserver.expect_request("/v1/models").respond_with_json(answer)
    assert_openai_envelope(fake_client.get("/v1/models"), 502)


def test_routed_models_are_listed_whether_up_or_not_with_what_their_upstream_tells(make_app, fake_upstreams):
    up, = fake_upstreams(1)
    up.expect_request("/v1/models").respond_with_json(
        {"data": [{"id": "file", "created": 7, "owned_by": "llamacpp", "meta": {"n_ctx": 2048}}]})
    client = routed_app(make_app, {"chat": [up.url_for("")], "embed": [unused_port_url()]}).test_client()
    listing = client.get("/v1/models").get_json()
    chat, embed = listing["data"]
    assert chat == {"id": "chat", "object": "model", "created": 7, "owned_by": "llamacpp", "meta": {"n_ctx": 2048},
                    "status": "loaded"}  # a llama-server the gateway does not run is always loaded
    assert embed["id"] == "embed" and embed["owned_by"] == "llamacpp" and "meta" not in embed
    client.get("/v1/models")
    assert len(up.log) == 1  # what a model is does not change: asked once
