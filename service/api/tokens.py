"""POST /tokenize, /detokenize and /apply-template: llama.cpp's tokenizer and chat template, by model."""
from flask import Blueprint

from ..proxy.relay import Endpoint, proxy_json_post
from ..schemas import ApplyTemplateSchema, DetokenizeSchema, TokenizeSchema
from .request_body import read_json_body

bp = Blueprint("tokens", __name__)
# The tokenizer and the template run in llama.cpp's HTTP thread, in no slot: they never queue for one.
TOKENIZE = Endpoint("/tokenize", "embeddings", takes_slot=False)
DETOKENIZE = Endpoint("/detokenize", "embeddings", takes_slot=False)
APPLY_TEMPLATE = Endpoint("/apply-template", "embeddings", takes_slot=False)
tokenize_schema, detokenize_schema, template_schema = TokenizeSchema(), DetokenizeSchema(), ApplyTemplateSchema()


@bp.post("/tokenize")
def tokenize():
    """Turn text into the model's token ids (with their pieces, if asked)."""
    raw, body = read_json_body(tokenize_schema)
    return proxy_json_post(TOKENIZE, raw, body)


@bp.post("/detokenize")
def detokenize():
    """Turn token ids back into text."""
    raw, body = read_json_body(detokenize_schema)
    return proxy_json_post(DETOKENIZE, raw, body)


@bp.post("/apply-template")
def apply_template():
    """Render chat messages into the prompt the model's chat template makes of them."""
    raw, body = read_json_body(template_schema)
    return proxy_json_post(APPLY_TEMPLATE, raw, body)
