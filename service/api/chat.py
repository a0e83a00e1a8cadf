"""POST /v1/chat/completions."""
from flask import Blueprint

from ..relay import proxy_generation
from ..request_body import read_json_body
from ..schemas import ChatCompletionSchema

bp = Blueprint("chat", __name__)
schema = ChatCompletionSchema()


@bp.post("/v1/chat/completions")
@bp.post("/chat/completions")
def chat_completions():
    """Create a chat completion on llama-server, streamed as SSE when the body asks for it."""
    raw, body = read_json_body(schema)
    return proxy_generation("/v1/chat/completions", "chat", raw, body)
