"""POST /v1/completions."""
from flask import Blueprint

from ..proxy.relay import Endpoint, proxy_generation
from ..schemas import CompletionSchema
from .request_body import read_json_body

bp = Blueprint("completions", __name__)
COMPLETIONS = Endpoint("/v1/completions", "completions", reuses_prompt=True)
schema = CompletionSchema()


@bp.post("/v1/completions")
@bp.post("/completions")
def completions():
    """Create a text completion on llama-server, streamed as SSE when the body asks for it."""
    raw, body = read_json_body(schema)
    return proxy_generation(COMPLETIONS, raw, body)
