"""What a GGUF file is called: a model's name from its file, a split model's parts, a projector's name. Both the
model files (model_file.py) and the Hub fetch (hub.py) name files by these, so naming lives here alone."""
import os
import re

# A split GGUF's parts: name-00001-of-00003.gguf ... name-00003-of-00003.gguf; llama.cpp loads the first.
SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)

# A multimodal projector (a vision or audio encoder: llama.cpp's --mmproj) by its name, as llama.cpp's own -hf
# tells one from a model: mmproj-F16.gguf, gemma-3-4b-it-mmproj-f16.gguf. It is no model of its own.
PROJECTOR_NAME = re.compile(r"mmproj", re.IGNORECASE)


def escaped(text: str) -> str:
    """text with every character that is not printable escaped as \\xNN, \\uNNNN or \\UNNNNNNNN: control
    characters (a newline would forge a log line) and format characters (a right-to-left override makes
    "rtl-\\u202egnp.exe" read as "rtl-exe.png"). A configured name may hold none of them (converters.MODEL_NAME);
    a file's name may, so a name taken from a file shows them as text."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


def model_name(path: str) -> str:
    """A model's name from its file: models/llama-8b.gguf is llama-8b; a split model's first part,
    qwen-7b-00001-of-00003.gguf, is qwen-7b. Characters that are not printable are escaped (escaped()), so two
    files can come out with one name: catalog.one_per_name serves the first and warns of the other."""
    base = os.path.basename(path)
    split = SPLIT_PART.search(base)
    return escaped(base[:split.start()] if split else os.path.splitext(base)[0])
