"""What models there are, from one of two readers: the models file (MODELS_FILE, else models.toml in the project root
when there is one) or the environment (service/models/environment.py). Never both: a models file beside a setting
that names models is refused, as the gateway cannot tell which one was meant.
"""
import logging
import os
from dataclasses import replace

from ..config import ConfigError
from ..paths import PROJECT_ROOT
from .environment import models_from_environment
from .models_file import read_models_file
from .spec import ModelSet

log = logging.getLogger(__name__)

DEFAULT_MODELS_FILE = os.path.join(PROJECT_ROOT, "models.toml")

# The settings that say which models exist: a models file says it instead. (The LLAMA_* process settings and
# MODEL_IDLE_TTL_S stay: they are every model's defaults.)
MODEL_DEFINING = ("LLAMA_MODEL", "MODEL_PATHS", "MODEL_SETTINGS", "ENABLED_MODELS", "MODEL_UPSTREAMS",
                  "LLAMA_SERVER_URL")


def models_file_path(settings, default: str = DEFAULT_MODELS_FILE):
    """The models file to read: MODELS_FILE (ConfigError when there is no such file), else default when it
    exists, else None (the models come from the environment)."""
    configured = settings["MODELS_FILE"]
    if not configured:
        return default if os.path.isfile(default) else None
    path = os.path.abspath(os.path.expanduser(configured))
    if not os.path.isfile(path):
        raise ConfigError(f"MODELS_FILE: {'is a folder' if os.path.isdir(path) else 'no such file'}: {path}")
    return path


def read_models(settings, *, check_args=None, fetch=False, default_file: str = DEFAULT_MODELS_FILE) -> ModelSet:
    """The models to serve: the models file's (every model routed by its name), else the environment's.
    check_args(args) -> problems judges a model's llama.cpp args; fetch: as models_from_environment's. Raises
    ConfigError (a ModelsFileError carries every problem of the file, one line each)."""
    path = models_file_path(settings, default_file)
    if path is None:
        return one_per_name(models_from_environment(settings, fetch=fetch))
    named = [name for name in MODEL_DEFINING if settings[name]]
    if named:
        other = "unset MODELS_FILE" if settings["MODELS_FILE"] else "move the file away"
        raise ConfigError(f"{', '.join(named)}: set, and the models file {path} names the models too: keep one "
                          f"(unset {' and '.join(named)}, or {other})")
    return models_of_file(path, check_args=check_args)


def models_of_file(path: str, *, check_args=None) -> ModelSet:
    """The models of the models file at path, every one routed by its name; ModelsFileError with every problem."""
    return ModelSet(tuple(read_models_file(path, check_args=check_args)), any_name=False, file=path)


def one_per_name(model_set: ModelSet) -> ModelSet:
    """model_set with one model per name. Two files in models/ can come out with one name (names.model_name: a
    file named with the escape "\\u202e" written out and one holding U+202E itself; a split model beside a whole
    one): the router would keep one and the other file would be served under no name, without a word. The first
    is kept, and each other is skipped with a warning that names both files."""
    kept, specs = {}, []
    for spec in model_set.specs:
        first = kept.setdefault(spec.id, spec)
        if first is spec:
            specs.append(spec)
            continue
        # As Python writes them (%r): a file's name may hold the very characters (an override, a newline) that
        # forge a log line, and a backslash is doubled, so that the two names never read the same.
        log.warning("model files %r and %r are both named %s: serving the first, skipping the second; rename one",
                    first.source, spec.source, spec.id)
    return model_set if len(specs) == len(model_set.specs) else replace(model_set, specs=tuple(specs))
