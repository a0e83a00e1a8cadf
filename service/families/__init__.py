"""API families: what differs between the APIs a client may speak to the gateway.

OpenAI's chat/completions/embeddings, OpenAI's Responses, Anthropic's Messages and llama.cpp's own endpoints
all go through the same policy and proxy path. What differs between them is data, described once per family
here: the error envelope and its types, the stream's error event, the rate-limit headers, where an answer
reports its token usage, the request-id headers, and any edit a stream's events need. The request path asks
the request's family (set from the matched route before any check runs) and never branches on its name.
"""
from .family import Family, RateState, Usage, family_for_blueprint, family_of_request
from .catalog import ANTHROPIC, LLAMA, OPENAI, RESPONSES

__all__ = ["Family", "RateState", "Usage", "family_for_blueprint", "family_of_request", "OPENAI", "RESPONSES",
           "ANTHROPIC", "LLAMA"]
