"""POST /infill: fill in the middle, for the editor plugins (llama.vim, llama.vscode)."""
from flask import Blueprint

from ..proxy.relay import Endpoint, proxy_generation
from ..schemas import InfillSchema
from .request_body import read_json_body

bp = Blueprint("infill", __name__)
INFILL = Endpoint("/infill", "completions", reuses_prompt=True)
schema = InfillSchema()


@bp.post("/infill")
def infill():
    """Complete code between input_prefix and input_suffix on llama-server (a model with FIM tokens; else its 501)."""
    raw, body = read_json_body(schema)
    return proxy_generation(INFILL, raw, body)
