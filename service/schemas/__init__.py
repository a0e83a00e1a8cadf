"""marshmallow schemas of every request body the gateway checks, one module per API family.

They check the fields each API defines and let every other field (llama.cpp's n_predict, grammar, samplers,
...) through untouched: the gateway forwards the client's own bytes, so a schema only validates.
"""
from .anthropic import CountTokensSchema, MessagesSchema
from .errors import AnthropicErrorSchema, ErrorSchema, first_error
from .llama import ApplyTemplateSchema, DetokenizeSchema, InfillSchema, RerankSchema, TokenizeSchema
from .openai import ChatCompletionSchema, CompletionSchema, EmbeddingSchema
from .responses import ResponseSchema

__all__ = ["ErrorSchema", "AnthropicErrorSchema", "first_error", "ChatCompletionSchema", "CompletionSchema",
           "EmbeddingSchema", "ResponseSchema", "MessagesSchema", "CountTokensSchema", "RerankSchema", "TokenizeSchema",
           "DetokenizeSchema", "ApplyTemplateSchema", "InfillSchema"]
