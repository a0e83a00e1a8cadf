"""What one model spec becomes here: its files (an hf: source, projector or draft fetched), the supervisor of its
llama.cpp with the command line the spec asks for, and the pool's view of it."""
import os
from typing import NamedTuple, Optional

from ..converters import HUB_PREFIX
from ..models.gguf_header import model_traits
from ..models.model_file import is_gguf, resolve
from ..models.model_memory import estimate_mib, fit_context
from ..models.models_file import ModelsFileError
from ..models.projector import fetch_projector
from . import flags
from .pooled_model import PooledModel
from .supervisor import LlamaSupervisor, find_binary

# llama.cpp's --cache-ram default.
LLAMA_CACHE_RAM_DEFAULT_MIB = 8192


class ModelFiles(NamedTuple):
    """The files a model's llama.cpp loads: its model, its projector and its draft (None: none)."""

    model: str
    mmproj: Optional[str] = None
    draft: Optional[str] = None


def resolve_files(spec, models_dir: str) -> ModelFiles:
    """The spec's files on this machine, each hf: one fetched into models_dir (or found kept there); raises
    LlamaStartError (hub.HubError) with one line saying what to do."""
    return ModelFiles(resolve(spec.source, models_dir), _projector(spec, models_dir),
                      resolve(spec.draft, models_dir) if spec.draft else None)


def check_loadable(spec, files: ModelFiles):
    """Raise ModelsFileError, a line per file (FILE:LINE: models.NAME.KEY: what), when one of the spec's files is not
    GGUF: llama.cpp would refuse it."""
    wrong = [f"{spec.origin}: models.{spec.id}.{key}: {path} is not a GGUF file, which llama.cpp cannot load"
             for key, path in (("source", files.model), ("mmproj", files.mmproj), ("draft", files.draft))
             if path and not is_gguf(path)]
    if wrong:
        raise ModelsFileError(wrong)


def _projector(spec, models_dir):
    if spec.mmproj in (None, "none"):
        return None
    if spec.mmproj == "auto" or spec.mmproj.startswith(HUB_PREFIX):
        return fetch_projector(spec.source, models_dir, spec.mmproj)  # None: its repo has none
    return spec.mmproj  # a path, checked by the models file's reader


def shown_files(spec) -> ModelFiles:
    """The spec's files as bin/serve --check shows them, nothing fetched: as written (an hf: name, "auto")."""
    return ModelFiles(spec.source, None if spec.mmproj in (None, "none") else spec.mmproj, spec.draft)


def supervisor_for(spec, settings, files: ModelFiles = None, *, port=None, alias=None) -> LlamaSupervisor:
    """A supervisor for one model: the LLAMA_* settings, then what its GGUF says of itself, then the spec's own;
    its command line ends with the spec's args, then its projector and draft. files: resolve_files' (default:
    the spec's source as a local path); alias: the model's id for llama.cpp (None: its file's name)."""
    files = files or ModelFiles(spec.source)
    traits = model_traits(files.model)
    options = {"port": port, "embeddings": settings["LLAMA_EMBEDDINGS"], "pooling": "mean"}
    ctx = spec.ctx or settings["LLAMA_CTX"]
    # Never a context past what the model was trained for (a file that cannot be read keeps the one asked).
    options["ctx"] = fit_context(spec.id, files.model, ctx) if traits.get("trained_ctx") else ctx
    if traits.get("embedding_only"):
        options.update(embeddings=True, pooling=None)  # the model's own pooling (rank for a reranker)
    own = {key: getattr(spec, key) for key in ("parallel", "threads", "embeddings") if getattr(spec, key) is not None}
    options.update(own)
    if spec.rerank:
        options.update(embeddings=True, pooling="rank")  # llama-server's --reranking: /v1/rerank
    args = [*spec.args, *(["--mmproj", files.mmproj] if files.mmproj else []),
            *(["--model-draft", files.draft] if files.draft else [])]
    return keep_slot_states(LlamaSupervisor.from_settings(settings, files.model, alias=alias, args=tuple(args),
                                                          **options), settings)


def keep_slot_states(supervisor, settings):
    """Give llama.cpp a folder for its slots' saved states (warm conversations, service/warm): one per identity
    (the file, the flags that shape a state, the llama.cpp build), so that a state is only ever restored where it
    was made. Nothing where they are off (KV_CACHE_DIR unset, KV_CACHE_DISK_MIB=0) or the model's own args name
    a folder: llama.cpp would save there, out of the gateway's sight."""
    from ..warm.identity import llama_build, model_identity

    supervisor.kv_identity = None
    if not settings.get("KV_CACHE_DIR") or not settings.get("KV_CACHE_DISK_MIB") or "--slot-save-path" in supervisor.args:
        return supervisor
    try:
        identity = model_identity(supervisor.model_path, supervisor.flags, llama_build(supervisor.binary))
    except OSError:  # a file not there (yet: bin/serve --check does not fetch): its load would fail anyway
        return supervisor
    supervisor.kv_identity = identity
    # Among the gateway's own flags, before the model's args (which come last, as written).
    at = len(supervisor.flags) - len(supervisor.args)
    supervisor.flags[at:at] = ["--slot-save-path", os.path.join(settings["KV_CACHE_DIR"], identity) + os.sep]
    return supervisor


def pooled_model(spec, supervisor, settings, files: ModelFiles = None) -> PooledModel:
    """The pool's view of one model: its idle TTL, pin and preload, and its estimated memory need."""
    return PooledModel(spec.id, supervisor, **lifecycle(spec, settings),
                       need_mib=need_mib(supervisor, settings, files))


def lifecycle(spec, settings) -> dict:
    """A model's settings in the pool that a reload changes in place (ModelPool.update's, need_mib aside)."""
    return {"ttl_s": settings["MODEL_IDLE_TTL_S"] if spec.ttl is None else spec.ttl, "pinned": spec.pin,
            "preload": spec.preload}


def need_mib(supervisor, settings, files: ModelFiles = None):
    """The memory a model's llama.cpp takes, estimated from its GGUFs (weights and KV cache, its draft's too, and
    its projector's size) and its prompt cache; None when there is no budget or the model cannot be read."""
    if not settings["MODELS_MEMORY_MIB"]:
        return None
    need = estimate_mib(supervisor.model_path, supervisor.ctx)
    if need is None:
        return None
    if files is not None and files.draft:
        need += estimate_mib(files.draft, supervisor.ctx) or 0.0
    if files is not None and files.mmproj and os.path.isfile(files.mmproj):
        need += os.path.getsize(files.mmproj) / 2 ** 20
    # Its prompt cache in host RAM, which llama.cpp fills as it caches prompts.
    return need + (LLAMA_CACHE_RAM_DEFAULT_MIB if supervisor.cache_ram is None else supervisor.cache_ram)


def args_check(settings):
    """check_args for the models file's reader: what this gateway's llama.cpp would refuse in a model's args (the
    reader names the model and key on each line). Raises LlamaStartError when LLAMA_SERVER_BIN names no program."""
    binary = find_binary(settings["LLAMA_SERVER_BIN"]) is not None
    return lambda args: flags.check_user_args(args, binary=binary)
