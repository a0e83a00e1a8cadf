"""Model files: what a GGUF is called, which ones models/ holds, which one the embedded llama.cpp serves alone
(LLAMA_MODEL, else the first *.gguf in models/, else the demo), and where an hf: name's file is (hub.py)."""
import glob
import logging
import os
from dataclasses import dataclass

from ..converters import HUB_PREFIX, local_model_path
from ..paths import MODELS_DIR
from .demo_model import DEMO_MODEL_NAME, is_current_demo, write_demo_model
from .errors import LlamaStartError
from .names import PROJECTOR_NAME, SPLIT_PART, model_name

log = logging.getLogger(__name__)

# Every GGUF file begins with these four bytes.
GGUF_MAGIC = b"GGUF"


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


def is_gguf(path: str) -> bool:
    """True when the file at path begins as every GGUF does."""
    try:
        with open(path, "rb") as file:
            return file.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def _served(path: str) -> bool:
    # One stray file must not stop the start (llama.cpp would refuse it): it is left out, with one line.
    if is_gguf(path):
        return True
    log.warning("not a GGUF file: skipped", extra={"fields": {"path": path}})
    return False


def model_files(models_dir: str = MODELS_DIR) -> list:
    """Every GGUF model in models_dir (*.gguf), by name; the demo model (written there if need be) if there is none.

    Only whole files count: a download in progress lives in models_dir/.cache/huggingface/download/ as
    *.incomplete until it is complete and moved here, and a split model counts once all its parts are here. A
    file that is not GGUF is skipped with a warning, and a projector (mmproj in its name) is no model: it is
    served with the model it belongs to.
    """
    found = sorted(path for path in glob.glob(os.path.join(models_dir, "*.gguf"))
                   if os.path.basename(path) != DEMO_MODEL_NAME and not PROJECTOR_NAME.search(os.path.basename(path))
                   and is_whole_model(path) and _served(path))
    if found:
        return [LocalModel(model_name(path), path, "models/") for path in found]
    os.makedirs(models_dir, exist_ok=True)
    demo = os.path.join(models_dir, DEMO_MODEL_NAME)
    if not is_current_demo(demo):  # none yet, or one an older checkout wrote
        write_demo_model(demo)
    return [LocalModel(model_name(demo), demo, "demo")]


def resolve(spec: str, models_dir: str = MODELS_DIR) -> str:
    """The local path of a model file setting: a path as it is; for hf:OWNER/REPO[:QUANT] or
    hf:OWNER/REPO/FILE.gguf, the copy kept in models_dir (no network call), else fetched there from Hugging Face
    first. Raises a LlamaStartError (hub.HubError for hf:) with one line saying what to do."""
    if not spec.startswith(HUB_PREFIX):
        try:
            return local_model_path(spec)
        except ValueError as error:
            raise LlamaStartError(str(error)) from None
    from .hub import fetch  # huggingface_hub is loaded only for models named hf:

    return fetch(spec, models_dir)


def choose_model(configured: str = None, models_dir: str = MODELS_DIR) -> LocalModel:
    """The one model to serve: LLAMA_MODEL (a path, or an hf: name, fetched if need be), else the first in
    models_dir, else the demo."""
    if configured:
        path = resolve(configured, models_dir)
        return LocalModel(model_name(path), path, "LLAMA_MODEL")
    return model_files(models_dir)[0]
