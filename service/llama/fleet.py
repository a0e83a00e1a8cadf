"""Which models bin/serve starts, one supervised llama.cpp each, and the routes to them.

MODEL_PATHS names them; else LLAMA_MODEL is the one; else every *.gguf in models/ is one, named after its
file (the demo model when there is none). ENABLED_MODELS narrows the list.
"""
from dataclasses import replace

from ..config import ConfigError
from ..models.model_file import LocalModel, choose_model, model_files, resolve
from ..models.model_memory import estimate_mib, fit_context
from ..paths import MODELS_DIR
from .pool import ModelPool
from .pooled_model import PooledModel
from .supervisor import LlamaSupervisor


def local_models(settings, models_dir: str = None) -> list:
    """The models to start, those named hf:... fetched (or found kept in MODELS_DIR); none when the settings name
    only upstreams that already run. A name in ENABLED_MODELS or MODEL_SETTINGS that no model has is refused."""
    models_dir = models_dir or settings["MODELS_DIR"] or MODELS_DIR
    if settings["MODEL_PATHS"]:
        models = [LocalModel(name, path, "MODEL_PATHS") for name, path in settings["MODEL_PATHS"].items()]
    elif settings["LLAMA_SERVER_URL"] or settings["MODEL_UPSTREAMS"]:
        models = []
    elif settings["LLAMA_MODEL"]:
        models = [choose_model(settings["LLAMA_MODEL"], models_dir)]
    else:
        models = model_files(models_dir)
    names = [model.name for model in models]
    # MODEL_SETTINGS also gives upstream models their slots=N (the scheduler's); ENABLED_MODELS picks local ones.
    _refuse_unknown("MODEL_SETTINGS", settings["MODEL_SETTINGS"], names + [
        name for name in settings["MODEL_UPSTREAMS"] or () if name not in names],
        none="none by name (LLAMA_SERVER_URL alone takes any name)")
    _refuse_unknown("ENABLED_MODELS", settings["ENABLED_MODELS"], names,
                    none="none that bin/serve starts (only LLAMA_SERVER_URL or MODEL_UPSTREAMS)")
    if settings["ENABLED_MODELS"]:
        models = [model for model in models if model.name in settings["ENABLED_MODELS"]]
    # After ENABLED_MODELS: a model left out is never downloaded.
    return [replace(model, path=resolve(model.path, models_dir)) for model in models]


def _refuse_unknown(setting: str, named, known, none: str):
    # A name no model has would be ignored without a word: a typo, or a setting meant for another start.
    unknown = [name for name in named or () if name not in known]
    if unknown:
        raise ConfigError(f"{setting}: no model named {', '.join(unknown)}; the models are: {', '.join(known) or none}")


def model_traits(path: str) -> dict:
    """What a GGUF says of itself: whether it is an embedding model (it has a pooling type), and its trained
    context length. Empty when the file cannot be read as GGUF: llama.cpp will say why."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        arch = fields["general.architecture"].contents()
    except Exception:  # noqa: BLE001 - any unreadable file is llama.cpp's to report
        return {}
    traits = {"embedding_only": f"{arch}.pooling_type" in fields}
    if f"{arch}.context_length" in fields:
        traits["trained_ctx"] = int(fields[f"{arch}.context_length"].contents())
    return traits


# llama.cpp's --cache-ram default.
LLAMA_CACHE_RAM_DEFAULT_MIB = 8192

# MODEL_SETTINGS options that are the gateway's (the pool's, the scheduler's), not llama.cpp's.
GATEWAY_OPTIONS = ("ttl", "preload", "pin", "slots")


def supervisor_for(model: LocalModel, settings, port=None) -> LlamaSupervisor:
    """A supervisor for one model: the LLAMA_* settings, then what the model file says of itself, then the
    model's own MODEL_SETTINGS."""
    traits = model_traits(model.path)
    options = {"port": port, "embeddings": settings["LLAMA_EMBEDDINGS"], "pooling": "mean"}
    if traits.get("trained_ctx"):
        options["ctx"] = fit_context(model.name, model.path, settings["LLAMA_CTX"])
    if traits.get("embedding_only"):
        options.update(embeddings=True, pooling=None)  # the model's own pooling (rank for a reranker)
    own = {key: value for key, value in _own_settings(model, settings).items() if key not in GATEWAY_OPTIONS}
    if own.pop("rerank", False):
        options.update(embeddings=True, pooling="rank")  # llama-server's --reranking: /v1/rerank
    options.update(own)
    return LlamaSupervisor.from_settings(settings, model.path, alias=model.name, **options)


def _own_settings(model, settings) -> dict:
    return dict((settings["MODEL_SETTINGS"] or {}).get(model.name, {}))


def pooled_model(model: LocalModel, supervisor: LlamaSupervisor, settings) -> PooledModel:
    """The pool's view of one model: its idle TTL, preload and pin settings, and its estimated memory need."""
    own = _own_settings(model, settings)
    need = estimate_mib(model.path, supervisor.ctx) if settings["MODELS_MEMORY_MIB"] else None
    if need is not None:
        # Its prompt cache in host RAM, which llama.cpp fills as it caches prompts.
        need += LLAMA_CACHE_RAM_DEFAULT_MIB if supervisor.cache_ram is None else supervisor.cache_ram
    return PooledModel(model.name, supervisor, ttl_s=own.get("ttl", settings["MODEL_IDLE_TTL_S"]),
                       pinned=own.get("pin", False), preload=own.get("preload", False), need_mib=need)


class Fleet:
    """The supervised llama.cpp servers of the local models, in a pool that loads them on demand."""

    def __init__(self, models, settings):
        self.models = models
        # LLAMA_PORT holds for one model; several get free ports.
        port = settings["LLAMA_PORT"] if len(models) == 1 else None
        self.supervisors = [supervisor_for(model, settings, port) for model in models]
        self.pool = ModelPool([pooled_model(model, supervisor, settings)
                               for model, supervisor in zip(models, self.supervisors)],
                              max_loaded=settings["MODELS_MAX_LOADED"], memory_mib=settings["MODELS_MEMORY_MIB"],
                              load_timeout_s=settings["LLAMA_STARTUP_TIMEOUT_S"])

    def start(self):
        """Start the llama.cpp servers that load at start (every one, unless MODELS_MAX_LOADED is set) side by
        side and wait until all serve; raise LlamaStartError if one does not."""
        self.pool.start()
        return self

    def stop(self):
        """Stop every llama.cpp."""
        self.pool.stop()

    def route_settings(self, settings) -> dict:
        """The settings that route to the local models: LLAMA_SERVER_URL for one model chosen without
        MODEL_PATHS (any model name is then accepted, as with one llama-server), else MODEL_UPSTREAMS, where
        a local model named there too becomes one more replica of it."""
        if len(self.models) == 1 and not settings["MODEL_PATHS"]:
            return {"LLAMA_SERVER_URL": self.supervisors[0].url}
        routes = dict(settings["MODEL_UPSTREAMS"] or {})
        for model, supervisor in zip(self.models, self.supervisors):
            routes[model.name] = (*routes.get(model.name, ()), supervisor.url)
        return {"MODEL_UPSTREAMS": routes}
