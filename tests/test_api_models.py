"""GET /v1/models: llama-server's list in OpenAI's shape."""
import pytest

from tests.test_errors import assert_envelope


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
                                                   "owned_by": "llamacpp"}]}


@pytest.mark.parametrize("answer", [{"data": "nope"}, {"models": []}, {"data": [{"name": "no id"}]}])
def test_a_listing_without_models_is_502(fake_client, httpserver, answer):
    httpserver.expect_request("/v1/models").respond_with_json(answer)
    assert_envelope(fake_client.get("/v1/models"), 502)
