"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, as llama.cpp serves it."""
from flask import Blueprint

from ..proxy.relay import Endpoint, proxy_generation, proxy_json_post
from ..schemas import CountTokensSchema, MessagesSchema
from .request_body import read_json_body

bp = Blueprint("messages", __name__)
MESSAGES = Endpoint("/v1/messages", "chat", reuses_prompt=True)
COUNT_TOKENS = Endpoint("/v1/messages/count_tokens", "embeddings", takes_slot=False)  # tokenizes, in no slot
messages_schema = MessagesSchema()
count_schema = CountTokensSchema()


@bp.post("/v1/messages")
def create_message():
    """Create a message on llama-server, streamed as Anthropic's SSE events when asked."""
    raw, body = read_json_body(messages_schema)
    return proxy_generation(MESSAGES, raw, body)


@bp.post("/v1/messages/count_tokens")
def count_tokens():
    """Count the input tokens a message would use."""
    raw, body = read_json_body(count_schema)
    return proxy_json_post(COUNT_TOKENS, raw, body)
