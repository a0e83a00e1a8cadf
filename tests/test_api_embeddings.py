"""POST /v1/embeddings against the real llama.cpp: every input form, float and base64, bytes untouched."""
import base64
import math
import struct

import pytest
import requests

pytestmark = pytest.mark.llama

DIMENSIONS = 64  # the demo model's embedding size


@pytest.mark.parametrize("text_input, count", [
    ("hello", 1),
    (["hello", "world", "again"], 3),
    ([1, 300, 301], 1),
    ([[1, 300], [1, 301, 302]], 2),
])
def test_every_input_form(llama_client, text_input, count):
    response = llama_client.post("/v1/embeddings", json={"model": "llama", "input": text_input})
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "list"
    assert [item["index"] for item in body["data"]] == list(range(count))
    for item in body["data"]:
        assert item["object"] == "embedding"
        assert len(item["embedding"]) == DIMENSIONS
        assert math.isclose(math.sqrt(sum(x * x for x in item["embedding"])), 1.0, rel_tol=1e-3)


def test_base64_bytes_come_back_exactly_as_llama_sent_them(llama_client, llama):
    request = {"model": "llama", "input": ["hello", "world"], "encoding_format": "base64"}
    direct = requests.post(llama.url + "/v1/embeddings", json=request, timeout=30)
    through = llama_client.post("/v1/embeddings", json=request)
    assert through.status_code == 200
    assert through.get_data() == direct.content
    encoded = through.get_json()["data"][0]["embedding"]
    vector = struct.unpack(f"<{DIMENSIONS}f", base64.b64decode(encoded))
    assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-3)


def test_base64_matches_float(llama_client):
    float_response = llama_client.post("/v1/embeddings", json={"input": "hello", "encoding_format": "float"})
    base64_response = llama_client.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"})
    assert (float_response.status_code, base64_response.status_code) == (200, 200)
    as_float = float_response.get_json()["data"][0]["embedding"]
    raw = base64.b64decode(base64_response.get_json()["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    # zip() stops at the shorter vector: without the lengths, an empty or cut vector would compare equal.
    assert len(decoded) == len(as_float) == DIMENSIONS
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(decoded, as_float))
