"""POST /v1/responses: OpenAI's Responses API, as llama.cpp serves it."""
from flask import Blueprint

from ..proxy.relay import Endpoint, proxy_generation
from ..schemas import ResponseSchema
from .request_body import read_json_body

bp = Blueprint("responses", __name__)
CREATE_RESPONSE = Endpoint("/v1/responses", "chat", reuses_prompt=True)
schema = ResponseSchema()


@bp.post("/v1/responses")
@bp.post("/responses")
def create_response():
    """Create a response on llama-server, streamed as SSE events (completed for the SDK's helper) when asked."""
    raw, body = read_json_body(schema)
    return proxy_generation(CREATE_RESPONSE, raw, body)
