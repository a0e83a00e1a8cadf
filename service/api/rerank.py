"""POST /v1/rerank (also /rerank, /v1/reranking, /reranking): order documents by relevance to a query."""
from flask import Blueprint

from ..proxy.relay import Endpoint, proxy_json_post
from ..schemas import RerankSchema
from .request_body import read_json_body

bp = Blueprint("rerank", __name__)
RERANK = Endpoint("/v1/rerank", "embeddings", answers=(dict, list))
schema = RerankSchema()


@bp.post("/v1/rerank")
@bp.post("/rerank")
@bp.post("/v1/reranking")
@bp.post("/reranking")
def rerank():
    """Rank the documents on llama-server (a reranker model, or MODEL_SETTINGS name:rerank=on; else its 501)."""
    raw, body = read_json_body(schema)
    return proxy_json_post(RERANK, raw, body)
