"""API families: what differs between the APIs a client may speak to the gateway.

OpenAI's chat/completions/embeddings, OpenAI's Responses, Anthropic's Messages and llama.cpp's own endpoints
all go through the same policy and proxy path. What differs between them is data, described once per family
here: the error envelope and its types, the stream's error event, the rate-limit headers, where an answer
reports its token usage, the request-id headers, and any edit a stream's events need. The request path asks
the request's family (set from the matched route before any check runs) and never branches on its name.
"""
from flask import current_app, request

from .catalog import ANTHROPIC, LLAMA, OPENAI, RESPONSES
from .family import Family, RateState, Usage

__all__ = ["Family", "RateState", "Usage", "family_for", "family_of_request", "OPENAI", "RESPONSES", "ANTHROPIC",
           "LLAMA"]


def family_for(families_by_path, path, speaks_anthropic: bool) -> Family:
    """The family of a request that matched no rule of a blueprint: its path's (a wrong method), else
    Anthropic's where the client says it speaks it (the anthropic-version header every Anthropic SDK sends),
    else OpenAI's."""
    family = families_by_path.get(path)
    if family is not None:
        return family
    return ANTHROPIC if speaks_anthropic else OPENAI


def family_of_request() -> Family:
    """The family of this request: its matched route's, else as family_for says."""
    family = current_app.extensions["families"].get(request.blueprint)
    if family is not None:
        return family
    return family_for(current_app.extensions["families_by_path"], request.path,
                      "anthropic-version" in request.headers)
