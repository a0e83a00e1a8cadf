"""The memory estimate of a GGUF, part by part, against the buffer sizes a real llama.cpp reports when it loads it."""
import collections
import logging
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from service.llama.supervisor import LlamaSupervisor, start_all
from service.models import demo_model
from service.models import gguf_header
from service.models.demo_model import write_demo_model
from service.models.model_memory import MIB, estimate, estimate_mib, fit_context, trained_context

SHAPES = {"demo": dict(embedding_size=64, layers=2, feed_forward_size=128),
          "wide": dict(embedding_size=256, layers=6, feed_forward_size=512)}
EXTRA_WORDS = 20000  # for a model whose vocabulary, as in real models, outweighs the rest of its compute buffer
CONTEXTS = (1024, 4096)

# llama.cpp prints its buffer sizes only from verbosity 4 (libllama's INFO lines); service.llama.child runs at 3.
VERBOSE_CHILD = """import sys
from service.llama import child
plain = child.server_params
def verbose(args):
    params = plain(args)
    params.verbosity = 4
    return params
child.server_params = verbose
child.main(sys.argv[1:])
"""

# What llama.cpp reports, in MiB with two decimals; a model may have several model buffers (mapped, repacked).
REPORTED = {"tensors": r"model buffer size =\s*([\d.]+) MiB", "kv_cache": r"llama_kv_cache: size =\s*([\d.]+) MiB",
            "compute": r"compute buffer size =\s*([\d.]+) MiB"}


class VerboseLlama(LlamaSupervisor):
    """A supervised llama.cpp at verbosity 4 that keeps all it printed; output_ended is set once it has all."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.output = collections.deque(maxlen=2000)
        self.output_ended = threading.Event()

    def command(self):
        return [sys.executable, "-c", VERBOSE_CHILD, *self.flags, "--exit-with-stdin"]

    def _read_output(self, process):
        super()._read_output(process)
        self.output_ended.set()


def reported(lines) -> dict:
    """llama.cpp's own figures, in MiB; a part it never printed is absent."""
    text = "\n".join(lines)
    return {part: sum(map(float, found)) for part, pattern in REPORTED.items() if (found := re.findall(pattern, text))}


def with_more_words(vocabulary):
    """The demo model's vocabulary and EXTRA_WORDS more words."""
    def bigger():
        tokens, types = vocabulary()
        return tokens + [f"\u2581w{i}" for i in range(EXTRA_WORDS)], types + [1] * EXTRA_WORDS
    return bigger


def write_bert(path, embedding_size=64, layers=2, feed_forward_size=128):
    """A tiny random BERT, the encoder architecture of most embedding models."""
    import gguf

    rng = np.random.default_rng(0)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(33, 127)]
    writer = gguf.GGUFWriter(path, "bert")
    for add, value in ((writer.add_context_length, 512), (writer.add_embedding_length, embedding_size),
                       (writer.add_block_count, layers), (writer.add_feed_forward_length, feed_forward_size),
                       (writer.add_head_count, 4), (writer.add_layer_norm_eps, 1e-12),
                       (writer.add_causal_attention, False), (writer.add_pooling_type, gguf.PoolingType.MEAN),
                       (writer.add_tokenizer_model, "bert"), (writer.add_token_list, tokens),
                       (writer.add_token_types, [3] * 5 + [1] * (len(tokens) - 5)), (writer.add_token_type_count, 2),
                       (writer.add_pad_token_id, 0), (writer.add_unk_token_id, 1), (writer.add_bos_token_id, 2),
                       (writer.add_eos_token_id, 3), (writer.add_sep_token_id, 3), (writer.add_mask_token_id, 4)):
        add(value)
    tensors = {"token_embd": (len(tokens), embedding_size), "token_types": (2, embedding_size),
               "position_embd": (512, embedding_size), "token_embd_norm": (embedding_size,)}
    for layer in range(layers):
        for name, rows in (("attn_q", embedding_size), ("attn_k", embedding_size), ("attn_v", embedding_size),
                           ("attn_output", embedding_size), ("ffn_up", feed_forward_size),
                           ("ffn_down", embedding_size)):
            columns = feed_forward_size if name == "ffn_down" else embedding_size
            tensors[f"blk.{layer}.{name}"] = (rows, columns)
        tensors[f"blk.{layer}.attn_output_norm"] = tensors[f"blk.{layer}.layer_output_norm"] = (embedding_size,)
    for name, shape in tensors.items():
        writer.add_tensor(name + ".weight", (rng.standard_normal(shape) * 0.02).astype(np.float32))
        if len(shape) == 1 or name.startswith("blk."):  # norms and every layer's matrices have a bias
            writer.add_tensor(name + ".bias", np.zeros(shape[0], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """For each (model, ctx): the model's path and what llama.cpp reported when it loaded it."""
    folder = tmp_path_factory.mktemp("model_memory")
    paths = {name: write_demo_model(str(folder / f"{name}.gguf"), **shape) for name, shape in SHAPES.items()}
    paths["bert"] = write_bert(str(folder / "bert.gguf"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_model, "_vocabulary", with_more_words(demo_model._vocabulary))
        paths["vocabulary"] = write_demo_model(str(folder / "vocabulary.gguf"))
    cases = [(name, ctx) for name in SHAPES for ctx in CONTEXTS] + [("bert", 1024), ("vocabulary", 1024)]
    llamas = {case: VerboseLlama(paths[case[0]], ctx=case[1], parallel=2, threads=1, startup_timeout=120)
              for case in cases}
    start_all(list(llamas.values()))  # side by side: each load takes milliseconds, each interpreter a second
    for llama in llamas.values():
        llama.stop()
    assert all(llama.output_ended.wait(10) for llama in llamas.values()), "llama.cpp's output never ended"
    return {case: (paths[case[0]], reported(llama.output)) for case, llama in llamas.items()}


@pytest.mark.llama
@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("ctx", CONTEXTS)
def test_each_part_matches_what_llama_cpp_allocates(measured, name, ctx):
    path, figures = measured[(name, ctx)]
    ours = estimate(path, ctx)
    # llama.cpp rounds to 0.01 MiB and aligns each tensor to 32 bytes in the file.
    assert ours.tensors / MIB == pytest.approx(figures["tensors"], abs=0.01)
    assert ours.kv_cache / MIB == pytest.approx(figures["kv_cache"], abs=0.005)
    # The compute part is a deliberate upper estimate: never below llama.cpp's, never far above it.
    assert figures["compute"] <= ours.compute / MIB <= 2 * figures["compute"] + 1


@pytest.mark.llama
def test_an_encoder_gets_no_kv_cache(measured):
    path, figures = measured[("bert", 1024)]
    ours = estimate(path, 1024)
    assert "kv_cache" not in figures and ours.kv_cache == 0
    assert ours.tensors / MIB == pytest.approx(figures["tensors"], abs=0.01)
    assert figures["compute"] <= ours.compute / MIB <= 2 * figures["compute"] + 1


@pytest.mark.llama
def test_the_logits_of_a_big_vocabulary_are_counted(measured):
    path, figures = measured[("vocabulary", 1024)]
    ours = estimate(path, 1024)
    assert ours.tensors / MIB == pytest.approx(figures["tensors"], abs=0.01)
    assert figures["compute"] > 20 * figures["kv_cache"]  # the logits of a whole batch, as in a real model
    assert figures["compute"] <= ours.compute / MIB <= 1.1 * figures["compute"]


def test_a_bigger_context_needs_more(demo_model_path):
    assert estimate_mib(demo_model_path, 8192) > estimate_mib(demo_model_path, 4096) > estimate_mib(demo_model_path, 1)


def test_kv_heads_and_head_widths_come_from_the_file(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "gqa.gguf"), "llama")
    writer.add_embedding_length(512)
    writer.add_block_count(3)
    writer.add_head_count(8)  # a head would be 64 wide, but the file says keys are 32 and values 16
    writer.add_head_count_kv([2, 0, 4])  # per layer; a layer without KV heads keeps no cache
    writer.add_key_length(32)
    writer.add_value_length(16)
    writer.add_tensor("token_embd.weight", np.zeros((3, 512), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    found = estimate(str(tmp_path / "gqa.gguf"), 1000, cache_type_bytes=1)
    assert found.tensors == 3 * 512 * 2
    assert found.kv_cache == 1024 * (2 + 0 + 4) * (32 + 16)  # the context rounded up to whole blocks of 256


@pytest.mark.parametrize("content", [b"", b"not a model at all", "truncated"])
def test_a_file_that_is_not_gguf_has_no_estimate(tmp_path, demo_model_path, content):
    if content == "truncated":
        content = Path(demo_model_path).read_bytes()[:5000]  # inside the header: the tokenizer's vocabulary
    (tmp_path / "model.gguf").write_bytes(content)
    assert estimate_mib(str(tmp_path / "model.gguf"), 1024) is None


def test_a_missing_file_or_a_folder_has_no_estimate(tmp_path):
    assert estimate_mib(str(tmp_path / "missing.gguf"), 1024) is None
    assert estimate_mib(str(tmp_path), 1024) is None


def gguf_with_context(path, context=None) -> str:
    """A GGUF of metadata only, trained for context tokens (None: it does not say)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    if context:
        writer.add_context_length(context)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_the_trained_context_comes_from_the_file(tmp_path):
    assert trained_context(gguf_with_context(tmp_path / "a.gguf", 2048)) == 2048
    assert trained_context(gguf_with_context(tmp_path / "b.gguf")) is None
    (tmp_path / "c.gguf").write_bytes(b"not a model")
    assert trained_context(str(tmp_path / "c.gguf")) is None
    assert trained_context(str(tmp_path / "missing.gguf")) is None


def test_a_context_capped_to_the_trained_length_says_so_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="service.models.model_memory")
    path = gguf_with_context(tmp_path / "short.gguf", 4096)
    assert fit_context("short", path, 65536) == 4096
    assert fit_context("short", path, 1024) == 1024
    assert fit_context("short", path, 4096) == 4096
    capped = [record for record in caplog.records
              if record.getMessage() == "context capped to the model's trained length"]
    assert [(record.levelname, record.fields) for record in capped] == [
        ("WARNING", {"model": "short", "asked": 65536, "trained": 4096})]


def test_a_model_file_is_read_once_for_its_traits_context_and_estimate(tmp_path, monkeypatch):
    import gguf

    reads = []

    class CountedReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            reads.append(path)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountedReader)
    path = gguf_with_context(tmp_path / "model.gguf", 4096)
    assert gguf_header.model_traits(path)["trained_ctx"] == fit_context("model", path, 8192) == 4096
    assert estimate_mib(path, 4096) > estimate_mib(path, 1024) > 0 and trained_context(path) == 4096
    assert len(reads) == 1
