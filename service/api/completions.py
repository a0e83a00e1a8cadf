"""POST /v1/completions."""
from flask import Blueprint

from ..relay import proxy_generation
from ..request_body import read_json_body
from ..schemas import CompletionSchema

bp = Blueprint("completions", __name__)
schema = CompletionSchema()


@bp.post("/v1/completions")
@bp.post("/completions")
def completions():
    """Create a text completion on llama-server, streamed as SSE when the body asks for it."""
    raw, body = read_json_body(schema)
    return proxy_generation("/v1/completions", "completions", raw, body)
