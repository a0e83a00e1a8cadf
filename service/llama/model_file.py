"""Model files: what a GGUF is called, which ones models/ holds, which one the embedded llama.cpp serves alone
(LLAMA_MODEL, else the first *.gguf in models/, else the demo), and where an hf: name's file is (hub.py)."""
import glob
import os
import re
from dataclasses import dataclass

from ..converters import HUB_PREFIX
from .demo_model import DEMO_MODEL_NAME, write_demo_model

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models")

# A split GGUF's parts: name-00001-of-00003.gguf ... name-00003-of-00003.gguf; llama.cpp loads the first.
SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class LocalModel:
    """A model file, the name it is served under, and how it was chosen ("MODEL_PATHS", "LLAMA_MODEL",
    "models/" or "demo")."""

    name: str
    path: str
    source: str

    @property
    def is_demo(self) -> bool:
        """True for the random-weight demo model."""
        return os.path.basename(self.path) == DEMO_MODEL_NAME


def model_name(path: str) -> str:
    """A model's name from its file: models/llama-8b.gguf is llama-8b; a split model's first part,
    qwen-7b-00001-of-00003.gguf, is qwen-7b."""
    base = os.path.basename(path)
    split = SPLIT_PART.search(base)
    return base[:split.start()] if split else os.path.splitext(base)[0]


def is_whole_model(path: str) -> bool:
    """True for a GGUF llama.cpp can load as a model: a single file, or the first part of a split model whose
    every part is there. A later part, or a split model still missing parts (a fetch cut between two parts), is
    no model."""
    split = SPLIT_PART.search(path)
    if not split:
        return True
    number, count = int(split[1]), int(split[2])
    return number == 1 and all(os.path.isfile(f"{path[:split.start()]}-{part:05d}-of-{split[2]}.gguf")
                               for part in range(2, count + 1))


def model_files(models_dir: str = MODELS_DIR) -> list:
    """Every *.gguf in models_dir, by name; the demo model (written there if need be) when there is none.

    Only whole files count: a download in progress lives in models_dir/.cache/huggingface/download/ as
    *.incomplete until it is complete and moved here, and a split model counts once all its parts are here.
    """
    found = sorted(path for path in glob.glob(os.path.join(models_dir, "*.gguf"))
                   if os.path.basename(path) != DEMO_MODEL_NAME and is_whole_model(path))
    if found:
        return [LocalModel(model_name(path), path, "models/") for path in found]
    os.makedirs(models_dir, exist_ok=True)
    demo = os.path.join(models_dir, DEMO_MODEL_NAME)
    if not os.path.isfile(demo):
        write_demo_model(demo)
    return [LocalModel(model_name(demo), demo, "demo")]


def resolve(spec: str, models_dir: str = MODELS_DIR) -> str:
    """The local path of a model file setting: a path as it is; for hf:OWNER/REPO[:QUANT] or
    hf:OWNER/REPO/FILE.gguf, the copy kept in models_dir (no network call), else fetched there from Hugging Face
    first. Raises hub.HubError, a LlamaStartError, with one line saying what to do."""
    if not spec.startswith(HUB_PREFIX):
        return spec
    from .hub import fetch  # huggingface_hub is loaded only for models named hf:

    return fetch(spec, models_dir)


def choose_model(configured: str = None, models_dir: str = MODELS_DIR) -> LocalModel:
    """The one model to serve: LLAMA_MODEL (a path, or an hf: name, fetched if need be), else the first in
    models_dir, else the demo."""
    if configured:
        path = resolve(configured, models_dir)
        return LocalModel(model_name(path), path, "LLAMA_MODEL")
    return model_files(models_dir)[0]
