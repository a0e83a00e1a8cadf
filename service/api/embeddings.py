"""POST /v1/embeddings."""
from flask import Blueprint

from ..proxy.relay import Endpoint, proxy_json_post
from ..schemas import EmbeddingSchema
from .request_body import read_json_body

bp = Blueprint("embeddings", __name__)
EMBEDDINGS = Endpoint("/v1/embeddings", "embeddings")
schema = EmbeddingSchema()


@bp.post("/v1/embeddings")
@bp.post("/embeddings")
def embeddings():
    """Embed the input on llama-server; base64 vectors come back byte for byte as llama.cpp encoded them."""
    raw, body = read_json_body(schema)
    return proxy_json_post(EMBEDDINGS, raw, body)
