"""What a GGUF's header says, read once per file. gguf's GGUFReader offers no way to skip an array: it walks each
entry of a tokenizer's arrays (Gemma 3's 262,144 tokens, scores and types take it seconds of CPU), and a model's
start asks its file for its traits, its trained context and its memory need. So the header is read once and what
those need is kept, in a small cache keyed by the file's real path, size and modification time: a file replaced or
rewritten in place (a new fetch, a new quantisation) is read again.
"""
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

# Files whose headers are kept: a gateway serves a handful of models, their drafts and projectors.
MAX_FILES = 16

# Arrays longer than this (a vocabulary, its scores, its merges) are kept as their length alone; per-layer
# hyperparameters (one entry per layer, a few hundred at most) are kept whole.
MAX_ARRAY_KEPT = 1024

# What GGUFReader raises on a file that is not GGUF: empty (ValueError from mmap), cut short (IndexError), no GGUF
# magic or an unknown type (ValueError), a key twice (KeyError), a folder (OSError).
UNREADABLE = (OSError, ValueError, IndexError, KeyError)


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF's metadata (its keys' values, long arrays as their length only) and its tensors' total size."""

    values: Mapping[str, Any]
    lengths: Mapping[str, int]
    tensor_bytes: int

    @property
    def architecture(self) -> str:
        """general.architecture (llama, gemma3, bert, ...); "" when the file does not say."""
        return self.values.get("general.architecture") or ""

    def has(self, key: str) -> bool:
        """True when the file has the key, whatever its value."""
        return key in self.values or key in self.lengths

    def value(self, key: str, default=None):
        """The key's value (a list for an array); default when the file has no such key or it is a long array."""
        return self.values.get(key, default)

    def length(self, key: str) -> int:
        """The number of entries of an array key (the vocabulary's size for tokenizer.ggml.tokens); 0 without it."""
        return self.lengths.get(key, 0)


def parse(path: str) -> Optional[GgufHeader]:
    """The header of the GGUF at path, read with GGUFReader (seconds for a big vocabulary); None if not GGUF."""
    from gguf import GGUFReader  # imported here: only a model file's header needs it
    from gguf.constants import GGUFValueType

    try:
        reader = GGUFReader(path)
        values, lengths = {}, {}
        for key, field in reader.fields.items():
            is_array = field.types and field.types[0] == GGUFValueType.ARRAY
            if is_array:
                lengths[key] = len(field.data)
            if not is_array or len(field.data) <= MAX_ARRAY_KEPT:
                try:
                    values[key] = field.contents()
                except UnicodeDecodeError:  # one broken string (a name, a template) is no reason to drop the rest
                    pass
        tensor_bytes = sum(int(tensor.n_bytes) for tensor in reader.tensors)
    except UNREADABLE:
        return None
    # Nothing of the reader is kept: its memory map is closed as it goes, and Windows can replace the file again.
    return GgufHeader(MappingProxyType(values), MappingProxyType(lengths), tensor_bytes)


class GgufHeaders:
    """A bounded, thread-safe cache of GGUF headers by (real path, size, mtime); each file is parsed once, even
    when several threads ask for it at once."""

    def __init__(self, max_files: int = MAX_FILES, parse: Callable[[str], Optional[GgufHeader]] = parse):
        self.max_files = max_files
        self._parse = parse
        self._lock = threading.Lock()
        self._headers = OrderedDict()  # key -> header (None: not GGUF), least recently used first
        self._reading = {}  # key -> the lock its one reader holds

    def get(self, path: str) -> Optional[GgufHeader]:
        """The header of the GGUF at path; None when it is missing or not GGUF."""
        try:
            real = os.path.realpath(path)
            stat = os.stat(real)
        except (OSError, ValueError):  # missing, or a path no system accepts (a NUL in it)
            return None
        key = (real, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._headers:
                self._headers.move_to_end(key)
                return self._headers[key]
            reading = self._reading.setdefault(key, threading.Lock())
        with reading:  # a second thread asking for the same file waits for the first one's read
            with self._lock:
                if key in self._headers:
                    return self._headers[key]
            try:
                header = self._parse(real)
                with self._lock:
                    self._headers[key] = header
                    while len(self._headers) > self.max_files:
                        self._headers.popitem(last=False)
            finally:
                with self._lock:
                    self._reading.pop(key, None)
        return header

    def __len__(self) -> int:
        with self._lock:
            return len(self._headers)


# The process's one cache: every model file's readers share it.
HEADERS = GgufHeaders()


def read_header(path: str) -> Optional[GgufHeader]:
    """The header of the GGUF at path, parsed once while the file stays the same; None when it is not GGUF."""
    return HEADERS.get(path)


def model_traits(path: str) -> dict:
    """What a GGUF says of itself: whether it is an embedding model (it has a pooling type), and its trained
    context length. Empty when the file cannot be read as GGUF: llama.cpp will say why."""
    header = read_header(path)
    arch = header.architecture if header else ""
    if not arch:
        return {}
    traits = {"embedding_only": header.has(f"{arch}.pooling_type")}
    if header.value(f"{arch}.context_length") is not None:
        traits["trained_ctx"] = int(header.value(f"{arch}.context_length"))
    return traits
