"""POST /v1/embeddings."""
from flask import Blueprint

from ..relay import proxy_json_post
from ..request_body import read_json_body
from ..schemas import EmbeddingSchema

bp = Blueprint("embeddings", __name__)
schema = EmbeddingSchema()


@bp.post("/v1/embeddings")
@bp.post("/embeddings")
def embeddings():
    """Embed the input on llama-server; base64 vectors come back byte for byte as llama.cpp encoded them."""
    raw, body = read_json_body(schema)
    return proxy_json_post("/v1/embeddings", "embeddings", raw, body)
