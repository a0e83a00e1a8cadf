"""POST /v1/chat/completions."""
from flask import Blueprint

from ..proxy.relay import Endpoint, proxy_generation
from ..schemas import ChatCompletionSchema
from .request_body import read_json_body

bp = Blueprint("chat", __name__)
CHAT = Endpoint("/v1/chat/completions", "chat", asks_stream_usage=True, reuses_prompt=True)
schema = ChatCompletionSchema()


@bp.post("/v1/chat/completions")
@bp.post("/chat/completions")
def chat_completions():
    """Create a chat completion on llama-server, streamed as SSE when the body asks for it."""
    raw, body = read_json_body(schema)
    return proxy_generation(CHAT, raw, body)
