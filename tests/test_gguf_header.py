"""A GGUF's header, parsed once per file: the same values as a fresh read, read again when the file changes, a
bounded cache, one read for threads asking at once."""
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from service.models import gguf_header
from service.models.demo_model import CONTEXT_LENGTH
from service.models.gguf_header import MAX_ARRAY_KEPT, GgufHeaders, model_traits, parse, read_header


def write_gguf(path, context=None, *, words=0, pooling=False) -> str:
    """A small llama GGUF: trained for context tokens (None: it does not say), with a vocabulary of words tokens
    and a pooling type if asked, and one tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    if context:
        writer.add_context_length(context)
    writer.add_head_count_kv([2, 0, 4])
    if words:
        writer.add_token_list([f"w{i}" for i in range(words)])
    if pooling:
        writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


class CountingParse:
    """parse(), counting its calls per path; a test may hold every call at release until it is set."""

    def __init__(self):
        self.calls = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, path):
        self.calls.append(path)
        self.release.wait(30)
        return parse(path)


def test_the_cached_header_is_what_the_file_says(demo_model_path):
    from gguf import GGUFReader

    reader = GGUFReader(demo_model_path)
    header = read_header(demo_model_path)
    assert header == parse(demo_model_path)
    assert header.tensor_bytes == sum(int(tensor.n_bytes) for tensor in reader.tensors) > 0
    assert dict(header.values) == {key: field.contents() for key, field in reader.fields.items()}
    assert header.architecture == "llama" and header.value("llama.context_length") == CONTEXT_LENGTH
    assert header.length("tokenizer.ggml.tokens") == len(reader.fields["tokenizer.ggml.tokens"].data) > 300
    assert read_header(demo_model_path) is header  # from the cache, not parsed again


def test_a_long_array_is_kept_as_its_length_alone(tmp_path):
    header = parse(write_gguf(tmp_path / "words.gguf", words=MAX_ARRAY_KEPT + 1))
    assert header.length("tokenizer.ggml.tokens") == MAX_ARRAY_KEPT + 1
    assert header.value("tokenizer.ggml.tokens") is None and header.has("tokenizer.ggml.tokens")
    assert header.value("llama.attention.head_count_kv") == [2, 0, 4]  # a per-layer array is kept whole
    assert header.length("llama.attention.head_count_kv") == 3 and header.length("missing") == 0


def test_each_file_is_parsed_once_until_it_changes(tmp_path):
    counting = CountingParse()
    headers = GgufHeaders(parse=counting)
    path = write_gguf(tmp_path / "a.gguf", 2048)
    assert headers.get(path).value("llama.context_length") == 2048
    assert headers.get(path).value("llama.context_length") == 2048
    if os.name != "nt":  # (a symlink needs privileges on Windows) the same file by another name is one entry
        os.symlink(path, tmp_path / "link.gguf")
        assert headers.get(str(tmp_path / "link.gguf")).value("llama.context_length") == 2048
    assert len(counting.calls) == 1
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: read again
    assert headers.get(path).value("llama.context_length") == 2048 and len(counting.calls) == 2
    write_gguf(path, 4096, words=10)  # rewritten, another size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # even with the mtime it had
    assert headers.get(path).value("llama.context_length") == 4096 and len(counting.calls) == 3


def test_the_cache_keeps_the_most_recently_used_files(tmp_path):
    counting = CountingParse()
    headers = GgufHeaders(max_files=2, parse=counting)
    a, b, c = (write_gguf(tmp_path / f"{name}.gguf", 1024) for name in "abc")
    for path in (a, b, a, c):  # c pushes out b, the least recently used
        headers.get(path)
    assert len(headers) == 2 and counting.calls == [a, b, c]
    headers.get(a)
    headers.get(b)
    assert len(headers) == 2 and counting.calls == [a, b, c, b]


@pytest.mark.parametrize("content", [None, b"", b"not a model at all", "folder"])
def test_a_file_that_is_not_gguf_has_no_header(tmp_path, content):
    counting = CountingParse()
    headers = GgufHeaders(parse=counting)
    path = tmp_path / "model.gguf"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert headers.get(str(path)) is None and headers.get(str(path)) is None
    assert len(counting.calls) == (0 if content is None else 1)  # a missing file has nothing to keep


def test_threads_asking_at_once_share_one_read(tmp_path, monkeypatch):
    counting = CountingParse()
    counting.release.clear()
    headers = GgufHeaders(parse=counting)
    path = write_gguf(tmp_path / "a.gguf", 2048)
    entering = threading.Semaphore(0)  # a release per thread that has the file's read lock and is taking it

    class AnnouncedLock:
        """The file's read lock, saying when a thread is about to take it."""

        def __init__(self):
            self.lock = threading.Lock()

        def __enter__(self):
            entering.release()
            self.lock.acquire()

        def __exit__(self, *_):
            self.lock.release()

    monkeypatch.setattr(gguf_header, "threading", SimpleNamespace(Lock=AnnouncedLock))
    found = []
    threads = [threading.Thread(target=lambda: found.append(headers.get(path))) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert all(entering.acquire(timeout=10) for _ in threads)  # the first one reading (held), three waiting
    counting.release.set()
    for thread in threads:
        thread.join(30)
    assert len(counting.calls) == 1 and len(found) == 4 and all(header is found[0] for header in found)


def test_traits_say_what_the_model_is(tmp_path, demo_model_path):
    assert model_traits(demo_model_path) == {"embedding_only": False, "trained_ctx": CONTEXT_LENGTH}
    assert model_traits(write_gguf(tmp_path / "embed.gguf", 512, pooling=True)) == {
        "embedding_only": True, "trained_ctx": 512}
    assert model_traits(write_gguf(tmp_path / "plain.gguf")) == {"embedding_only": False}
    (tmp_path / "not.gguf").write_bytes(b"not a model")
    assert model_traits(str(tmp_path / "not.gguf")) == {} and model_traits(str(tmp_path / "missing.gguf")) == {}
