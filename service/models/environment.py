"""The models the environment names, as specs: the quick start read as "a models file of one".

LLAMA_SERVER_URL is one llama-server that takes any model name. Else MODEL_PATHS names the models bin/serve runs,
and MODEL_UPSTREAMS the llama-servers run elsewhere (a name in both: the local model is one more replica). Else
LLAMA_MODEL is the one model; else every *.gguf in models/ is one, named after its file (the demo model when there
is none). ENABLED_MODELS narrows the local ones; MODEL_SETTINGS gives each its own options. Nothing is fetched
here: an hf: source stays a spec, which the fleet fetches when it starts the model.
"""
from dataclasses import replace

from ..config import ConfigError
from ..converters import HUB_PREFIX, hub_model
from ..paths import MODELS_DIR
from .model_file import model_files
from .names import model_name
from .spec import ModelSet, ModelSpec, Origin

# The id of the one model LLAMA_SERVER_URL serves: it is never shown (its route takes any name, and is listed
# by what the llama-server says of itself).
ANY_NAME_ID = "llama-server"


def upstream_models(settings) -> ModelSet:
    """MODEL_UPSTREAMS (one model per name, its URLs the replicas) or LLAMA_SERVER_URL (one model of any name)
    as a ModelSet, without any per-model options."""
    if settings["MODEL_UPSTREAMS"]:
        return ModelSet(tuple(ModelSpec(name, upstreams=tuple(urls), origin=Origin("MODEL_UPSTREAMS"))
                              for name, urls in settings["MODEL_UPSTREAMS"].items()))
    return ModelSet((ModelSpec(ANY_NAME_ID, upstreams=(settings["LLAMA_SERVER_URL"],),
                               origin=Origin("LLAMA_SERVER_URL")),), any_name=True)


def models_from_environment(settings, models_dir: str = None, fetch: bool = False) -> ModelSet:
    """The models the settings name, as a ModelSet. A name in ENABLED_MODELS or MODEL_SETTINGS that no model has
    is refused (ConfigError). fetch: an hf: LLAMA_MODEL that must be named (by its file) for MODEL_SETTINGS or
    ENABLED_MODELS and is not kept yet is fetched to learn its name, as the start would a moment later."""
    models_dir = models_dir or settings["MODELS_DIR"] or MODELS_DIR
    if settings["MODEL_PATHS"] and settings["LLAMA_SERVER_URL"]:
        raise ConfigError("LLAMA_SERVER_URL: set it or MODEL_PATHS, not both (LLAMA_SERVER_URL takes any model "
                          "name; to add a llama-server to named models, use MODEL_UPSTREAMS)")
    if settings["MODEL_PATHS"]:
        local = [ModelSpec(name, source=path, origin=Origin("MODEL_PATHS"))
                 for name, path in settings["MODEL_PATHS"].items()]
    elif settings["LLAMA_SERVER_URL"] or settings["MODEL_UPSTREAMS"]:
        local = []
    elif settings["LLAMA_MODEL"]:
        source = settings["LLAMA_MODEL"]
        local = [ModelSpec(_chosen_name(source, settings, models_dir, fetch), source=source,
                           origin=Origin("LLAMA_MODEL"))]
    else:
        local = [ModelSpec(model.name, source=model.path, origin=Origin(model.source))
                 for model in model_files(models_dir)]
    names = [spec.id for spec in local]
    upstreams = settings["MODEL_UPSTREAMS"] or {}
    # MODEL_SETTINGS also gives upstream models their slots=N (the scheduler's); ENABLED_MODELS picks local ones.
    _refuse_unknown("MODEL_SETTINGS", settings["MODEL_SETTINGS"], names + [name for name in upstreams
                                                                           if name not in names],
                    none="none by name (LLAMA_SERVER_URL alone takes any name)")
    _refuse_unknown("ENABLED_MODELS", settings["ENABLED_MODELS"], names,
                    none="none that bin/serve starts (only LLAMA_SERVER_URL or MODEL_UPSTREAMS)")
    if settings["ENABLED_MODELS"]:
        local = [spec for spec in local if spec.id in settings["ENABLED_MODELS"]]
    if settings["LLAMA_SERVER_URL"]:
        model_set = upstream_models(settings)
    elif len(local) == 1 and not settings["MODEL_PATHS"] and not upstreams:
        # One model chosen without names takes any model name, as one llama-server does.
        model_set = ModelSet(tuple(local), any_name=True)
    else:
        model_set = ModelSet(_with_upstreams(local, upstreams))
    # Each option MODEL_SETTINGS takes (converters.MODEL_OPTIONS) is a ModelSpec field of the same name and meaning.
    own = settings["MODEL_SETTINGS"] or {}
    return replace(model_set, specs=tuple(replace(spec, **own.get(spec.id, {})) for spec in model_set.specs))


def _with_upstreams(local, upstreams) -> tuple:
    """The upstream models in MODEL_UPSTREAMS' order (a local model of the same name joins its replicas), then the
    other local ones."""
    by_name = {spec.id: spec for spec in local}
    specs = [replace(by_name.pop(name, ModelSpec(name, origin=Origin("MODEL_UPSTREAMS"))), upstreams=tuple(urls))
             for name, urls in upstreams.items()]
    return tuple(specs + [spec for spec in local if spec.id in by_name])


def _chosen_name(source: str, settings, models_dir: str, fetch: bool) -> str:
    """The name of the one model LLAMA_MODEL names: its file's. For an hf: name that picks a file by quant, the
    copy kept in models_dir says it (no network call); else, only where a setting names it, the fetch does."""
    if not source.startswith(HUB_PREFIX):
        return model_name(source)
    _, _, file = hub_model(source)
    if file:
        return model_name(file)
    from .hub import fetch as fetch_model, kept_copy  # huggingface_hub is loaded only for models named hf:

    kept = kept_copy(models_dir, source)
    if kept is None and fetch and (settings["MODEL_SETTINGS"] or settings["ENABLED_MODELS"]):
        kept = fetch_model(source, models_dir)
    # Not kept and not fetched (bin/serve --check): named by the spec until its file is known. Its llama.cpp is
    # named after the file all the same (a model of any name is never named by the gateway).
    return model_name(kept) if kept else source


def _refuse_unknown(setting: str, named, known, none: str):
    # A name no model has would be ignored without a word: a typo, or a setting meant for another start.
    unknown = [name for name in named or () if name not in known]
    if unknown:
        raise ConfigError(f"{setting}: no model named {', '.join(unknown)}; the models are: {', '.join(known) or none}")
