"""Model files: what a GGUF is called, which ones models/ holds, and which one the embedded llama.cpp serves
alone (LLAMA_MODEL, else the first *.gguf in models/, else the demo)."""
import glob
import os
from dataclasses import dataclass

from .demo_model import DEMO_MODEL_NAME, write_demo_model

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models")


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
    """A model's name from its file: models/llama-8b.gguf is llama-8b."""
    return os.path.splitext(os.path.basename(path))[0]


def model_files(models_dir: str = MODELS_DIR) -> list:
    """Every *.gguf in models_dir, by name; the demo model (written there if need be) when there is none."""
    found = sorted(path for path in glob.glob(os.path.join(models_dir, "*.gguf"))
                   if os.path.basename(path) != DEMO_MODEL_NAME)
    if found:
        return [LocalModel(model_name(path), path, "models/") for path in found]
    os.makedirs(models_dir, exist_ok=True)
    demo = os.path.join(models_dir, DEMO_MODEL_NAME)
    if not os.path.isfile(demo):
        write_demo_model(demo)
    return [LocalModel(model_name(demo), demo, "demo")]


def choose_model(configured: str = None, models_dir: str = MODELS_DIR) -> LocalModel:
    """The one model to serve: LLAMA_MODEL, else the first in models_dir, else the demo."""
    if configured:
        return LocalModel(model_name(configured), configured, "LLAMA_MODEL")
    return model_files(models_dir)[0]
