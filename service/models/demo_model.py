"""A tiny llama-architecture GGUF with random weights, written with the gguf package.

It loads in milliseconds and exercises every llama-server route (chat, completions, streams, embeddings),
but its answers are noise: it is for trying the gateway and for tests, never for real answers.
"""
import os

import numpy as np

DEMO_MODEL_NAME = "demo-random-tiny-llama.gguf"
# Written into the file (general.version): a kept demo of another version is written again. Raise it whenever
# the demo changes, or checkouts that kept the old file in models/ go on serving it.
DEMO_VERSION = "2"  # 2: trained context 131072 (was 4096)

# Shape of the demo model: small enough to write in milliseconds, a real llama graph all the same.
EMBEDDING_SIZE = 64
LAYERS = 2
HEADS = 4
FEED_FORWARD_SIZE = 128
# What llama.cpp caps the context at. Long, so that the demo takes agents' prompts (11k-25k tokens) at whatever
# LLAMA_CTX asks; it costs nothing in the file, only the KV cache a bigger LLAMA_CTX allocates.
CONTEXT_LENGTH = 131072


def _vocabulary():
    """A SentencePiece-style vocabulary: control tokens, all 256 byte tokens, and printable ASCII pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    types = [2, 3, 3] + [6] * 256  # unknown, control, control, then bytes
    pieces = ["\u2581"] + [chr(c) for c in range(33, 127)] + ["\u2581" + chr(c) for c in range(97, 123)]
    return tokens + pieces, types + [1] * len(pieces)


def write_demo_model(path: str, seed: int = 0, *, embedding_size: int = EMBEDDING_SIZE, layers: int = LAYERS,
                     feed_forward_size: int = FEED_FORWARD_SIZE) -> str:
    """Write the demo GGUF to path (atomically, so a crash never leaves half a model) and return path.

    Bigger sizes give a slower model, for tests that need a generation to last a while.
    """
    import gguf  # imported here: only the demo model needs it

    rng = np.random.default_rng(seed)
    tokens, token_types = _vocabulary()
    partial = f"{path}.{os.getpid()}.partial"  # two gateways starting at once each write their own
    writer = gguf.GGUFWriter(partial, "llama")
    writer.add_name("demo random tiny llama")
    writer.add_version(DEMO_VERSION)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(embedding_size)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(feed_forward_size)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(embedding_size // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(token_types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def weights(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(size):
        return np.ones(size, dtype=np.float32)

    writer.add_tensor("token_embd.weight", weights(len(tokens), embedding_size))
    writer.add_tensor("output_norm.weight", ones(embedding_size))
    writer.add_tensor("output.weight", weights(len(tokens), embedding_size))
    for layer in range(layers):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", ones(embedding_size))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}{name}.weight", weights(embedding_size, embedding_size))
        writer.add_tensor(prefix + "ffn_norm.weight", ones(embedding_size))
        writer.add_tensor(prefix + "ffn_gate.weight", weights(feed_forward_size, embedding_size))
        writer.add_tensor(prefix + "ffn_up.weight", weights(feed_forward_size, embedding_size))
        writer.add_tensor(prefix + "ffn_down.weight", weights(embedding_size, feed_forward_size))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, path)
    return path


def is_current_demo(path: str) -> bool:
    """True when path holds the demo model this code writes (its version), False for an older one or no GGUF."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).get_field("general.version")
    except (OSError, ValueError, IndexError):  # missing, empty, not GGUF, truncated
        return False
    return field is not None and field.contents() == DEMO_VERSION
