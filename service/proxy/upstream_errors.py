"""llama-server's error answers as the gateway's exceptions: its status and words kept where a client can act on
them, the gateway's advice where they name a flag of llama.cpp's own binary, nothing of a body that is not
llama.cpp's error object. upstream.py raises what these build; together they are the one place upstream failures
are translated."""
import re

from ..errors import UpstreamBadResponse, UpstreamError, UpstreamRejected, UpstreamUnavailable

# llama.cpp's error types that have an OpenAI error code of their own.
UPSTREAM_ERROR_CODES = {"exceed_context_size_error": "context_length_exceeded"}

# llama.cpp's advice names flags of its own binary, which a user of the gateway cannot pass to the models it
# runs: (llama.cpp's words, from the start of its message: a message can quote the request; what to set instead,
# {0} the words' first group; the status and type the client gets, None keeping llama.cpp's).
_OWN_SERVER = "a llama-server of your own (LLAMA_SERVER_URL, MODEL_UPSTREAMS) needs"
_PROJECTOR = ("that needs a multimodal projector (llama.cpp's mmproj file) beside the model: set mmproj for this "
              "model in the models file (\"auto\" fetches an hf: model's own); a llama-server of your own "
              "(LLAMA_SERVER_URL, MODEL_UPSTREAMS) needs --mmproj")
UPSTREAM_HINTS = (
    (re.compile(r"^This server does not support reranking"),
     "This model does not support reranking: for a model the gateway runs, set MODEL_SETTINGS=<model>:rerank=on "
     f"(or serve a reranker, whose GGUF says pooling type rank); {_OWN_SERVER} --reranking", None, None),
    (re.compile(r"^This server does not support embeddings"),
     "This model does not serve embeddings: for a model the gateway runs, set LLAMA_EMBEDDINGS=on or "
     f"MODEL_SETTINGS=<model>:embeddings=on; {_OWN_SERVER} --embeddings", None, None),
    # A 500 from llama.cpp, but the request is what this model cannot take.
    (re.compile(r"^(image|audio) input is not supported"),
     f"This model cannot read {{0}} input: {_PROJECTOR}", 400, "invalid_request_error"),
    (re.compile(r"^Multimodal data provided, but model does not support"),
     f"This model cannot read images or audio: {_PROJECTOR}", 400, "invalid_request_error"),
)



def status_error(response, path) -> UpstreamError:
    """Translate an upstream error answer into the exception the client should see."""
    message, upstream_type = _upstream_error_message(response)
    response.close()
    status, message, upstream_type = _advised(response.status_code, message, upstream_type)
    if status == 503:
        retry_after = response.headers.get("Retry-After") or "1"
        return UpstreamUnavailable(f"llama-server cannot serve yet: {message}", status=503, kind="loading",
                                   headers={"Retry-After": retry_after}, upstream_status=status)
    if 400 <= status < 500 or status == 501:
        return UpstreamRejected(message, status=status, type=_client_error_type(upstream_type),
                                code=UPSTREAM_ERROR_CODES.get(upstream_type), upstream_status=response.status_code)
    # A 5xx message is logged (errors.handle_api_error, a replica's ejection), and llama.cpp's 500s can quote the
    # request: a malformed tool call whole (common_chat_msgs_parse_oaicompat), the whole tools array
    # (common_chat_tools_parse_oaicompat). So llama.cpp's own words go to the client only, as the detail.
    said = _describe(response, upstream_type)
    return UpstreamBadResponse(f"llama-server answered {path} with HTTP {status} ({said})", kind="5xx",
                               upstream_status=status, detail=message)


def _advised(status, message, upstream_type) -> tuple:
    """(status, message, type) for the client: the gateway's advice (which quotes nothing of the request) in place
    of llama.cpp's where that names a flag of its own binary, else llama.cpp's own."""
    for words, advice, advised_status, advised_type in UPSTREAM_HINTS:
        found = words.search(message)
        if found:
            return advised_status or status, advice.format(*found.groups()), advised_type or upstream_type
    return status, message, upstream_type


def _client_error_type(upstream_type):
    """Keep llama.cpp's error type, except where OpenAI has its own name for the same thing."""
    return "invalid_request_error" if upstream_type in UPSTREAM_ERROR_CODES else upstream_type


def _upstream_error_message(response):
    """Return llama.cpp's error message and type from an error answer. A body that is not llama.cpp's error
    JSON is described, never quoted: it could echo the prompt into messages and logs."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"]), error.get("type")
    if isinstance(error, str):
        return error, None
    kind = response.headers.get("Content-Type", "no content type").split(";")[0]
    return f"an answer of {len(response.content)} bytes ({kind}) that is not an error object", None


def _describe(response, upstream_type) -> str:
    """Say what kind of error answer this was without quoting any of it."""
    if isinstance(upstream_type, str) and upstream_type.isidentifier() and len(upstream_type) <= 64:
        return upstream_type  # llama.cpp's error types are names such as server_error
    kind = response.headers.get("Content-Type", "no content type").split(";")[0]
    return f"{len(response.content)} bytes of {kind}"
