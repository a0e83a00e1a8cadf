"""Which GGUF the embedded llama.cpp serves: LLAMA_MODEL, else the first *.gguf in models/, else the demo."""
import glob
import os
from dataclasses import dataclass

from .demo_model import DEMO_MODEL_NAME, write_demo_model

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models")


@dataclass(frozen=True)
class ModelChoice:
    """The model file and how it was chosen ("LLAMA_MODEL", "models/", or "demo")."""

    path: str
    source: str

    @property
    def is_demo(self) -> bool:
        """True for the random-weight demo model."""
        return os.path.basename(self.path) == DEMO_MODEL_NAME


def choose_model(configured: str = None, models_dir: str = MODELS_DIR) -> ModelChoice:
    """Pick the model to serve, writing the demo model into models_dir when there is nothing else."""
    if configured:
        return ModelChoice(configured, "LLAMA_MODEL")
    found = sorted(path for path in glob.glob(os.path.join(models_dir, "*.gguf"))
                   if os.path.basename(path) != DEMO_MODEL_NAME)
    if found:
        return ModelChoice(found[0], "models/")
    os.makedirs(models_dir, exist_ok=True)
    demo = os.path.join(models_dir, DEMO_MODEL_NAME)
    if not os.path.isfile(demo):
        write_demo_model(demo)
    return ModelChoice(demo, "demo")
