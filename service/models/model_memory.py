"""How much RAM llama.cpp needs to serve a GGUF, read from the file's header alone (no model is loaded): its
tensors, the KV cache the context implies, and a compute buffer, so a memory budget can be kept before a load.

Checked against llama.cpp's own figures in tests/test_model_memory.py. Known over-estimates, all on the safe
side: sliding-window layers (Gemma 2/3, ...) are counted with a full-context cache, and MLA models (DeepSeek 2/3)
with their uncompressed key and value widths. Recurrent models (Mamba, RWKV) get no KV cache here and their small
recurrent state is not counted.
"""
import logging
from dataclasses import dataclass

from .gguf_header import GgufHeader, read_header

log = logging.getLogger(__name__)

MIB = 1024 * 1024

# llama.cpp rounds the context up to whole blocks of 256 cells (llama-context.cpp: GGML_PAD(n_ctx, 256)). With
# several slots it rounds each slot's share too, so a server with n slots may hold up to (n - 1) * 256 more cells.
CTX_PAD = 256

# Tokens llama.cpp computes in one pass (n_ubatch, default 512): its compute buffer is sized for a batch this big.
UBATCH = 512

# Architectures llama.cpp builds no KV cache for (llama_model::create_memory returns nullptr): encoders, which read
# the whole input in one pass, and diffusion models. A pooling_type key does not tell them apart: an embedding model
# on a decoder architecture (Qwen3-Embedding is "qwen3") gets a KV cache like any other.
NO_KV_CACHE = frozenset({
    "bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe", "neo-bert", "eurobert", "modern-bert",
    "gemma-embedding", "wavtokenizer-dec", "dream", "llada", "llada-moe", "rnd1"})


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes llama.cpp needs for a model: its tensors, its KV cache, its compute buffer."""

    tensors: int
    kv_cache: float
    compute: float

    @property
    def mib(self) -> float:
        """The whole, in MiB."""
        return (self.tensors + self.kv_cache + self.compute) / MIB


def _per_layer(value, layers: int) -> list:
    # Many hyperparameters are either one number or an array with one entry per layer.
    return list(value) if isinstance(value, list) else [value] * layers


def kv_cache_bytes(header: GgufHeader, ctx: int, cache_type_bytes: float = 2.0) -> float:
    """Bytes of the KV cache for ctx tokens: every layer keeps a key and a value vector per token."""
    arch = header.architecture
    layers = header.value(f"{arch}.block_count", 0)
    if arch in NO_KV_CACHE or not layers:
        return 0.0
    heads = _per_layer(header.value(f"{arch}.attention.head_count", 0), layers)
    heads_kv = _per_layer(header.value(f"{arch}.attention.head_count_kv", heads), layers)
    # As llama.cpp: a head is n_embd / n_head wide (the first layer's n_head) unless the file says otherwise.
    head_width = header.value(f"{arch}.embedding_length", 0) // heads[0] if heads[0] else 0
    key_width = header.value(f"{arch}.attention.key_length", head_width)
    value_width = header.value(f"{arch}.attention.value_length", head_width)
    cells = -(-ctx // CTX_PAD) * CTX_PAD
    return cells * sum(n * (key_width + value_width) for n in heads_kv[:layers]) * cache_type_bytes


def compute_bytes(header: GgufHeader, ctx: int) -> float:
    """Bytes of llama.cpp's compute buffer (CPU, flash attention), an upper estimate."""
    # The f32 activations of one batch: the logits of each of its tokens (n_outputs is n_ubatch at worst), about
    # seven tensors as wide as the embedding around attention, three as wide as the feed-forward (gate, up, their
    # product); plus the f16 attention mask, a row per cached cell. llama.cpp's allocator reuses memory from one
    # phase to the next where this adds the phases up: measured, 1.04x its figure when the logits dominate (as in
    # real models), up to 2x on tiny ones. The mask assumes one slot, the most it can be.
    arch = header.architecture
    vocabulary = header.length("tokenizer.ggml.tokens")
    embedding = header.value(f"{arch}.embedding_length", 0)
    feed_forward = max(_per_layer(header.value(f"{arch}.feed_forward_length", 0), 1) or [0])
    cells = -(-ctx // CTX_PAD) * CTX_PAD
    return UBATCH * (4 * (vocabulary + 7 * embedding + 3 * feed_forward) + 2 * cells)


def estimate(path: str, ctx: int, *, cache_type_bytes: float = 2.0):
    """What llama.cpp needs to serve the GGUF at path with ctx tokens, part by part; None if it is not GGUF."""
    header = read_header(path)
    if header is None:  # missing, empty, not GGUF, truncated
        return None
    return MemoryEstimate(tensors=header.tensor_bytes, kv_cache=kv_cache_bytes(header, ctx, cache_type_bytes),
                          compute=compute_bytes(header, ctx))


def estimate_mib(path: str, ctx: int, *, cache_type_bytes: float = 2.0) -> float | None:
    """MiB llama.cpp needs to serve the GGUF at path with a context of ctx tokens (all slots together); None when
    the file cannot be read as GGUF."""
    found = estimate(path, ctx, cache_type_bytes=cache_type_bytes)
    return None if found is None else found.mib


def trained_context(path: str) -> int | None:
    """The context length the GGUF at path was trained for (its <arch>.context_length); None when it does not say
    or cannot be read as GGUF."""
    header = read_header(path)
    if header is None:  # missing, empty, not GGUF, truncated
        return None
    length = header.value(f"{header.architecture}.context_length")
    return int(length) if length else None


def fit_context(model: str, path: str, asked: int) -> int:
    """The context to run a model with: asked, capped to what the model was trained for, with a warning when it
    is (a client's long prompt then fails, and the setting alone would not say why)."""
    trained = trained_context(path)
    if trained is None or asked <= trained:
        return asked
    log.warning("context capped to the model's trained length",
                extra={"fields": {"model": model, "asked": asked, "trained": trained}})
    return trained
