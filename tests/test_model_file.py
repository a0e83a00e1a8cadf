"""Model files: which files in models/ are served, the demo model written there, and model file settings that
name no file."""
import logging
import os

import pytest

from service.models import demo_model
from service.models.demo_model import CONTEXT_LENGTH, DEMO_MODEL_NAME, is_current_demo, write_demo_model
from service.models.errors import LlamaStartError
from service.models.model_file import local_model_path, model_files, resolve
from service.models.model_memory import fit_context, trained_context


def skipped(caplog) -> list:
    """The files model_files said it skipped."""
    return [record.fields["path"] for record in caplog.records if record.getMessage() == "not a GGUF file: skipped"]


def test_a_file_that_is_not_gguf_is_skipped_with_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="service.models.model_file")
    (tmp_path / "chat.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (tmp_path / "notes.gguf").write_bytes(b"a stray file that is no model")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert [model.name for model in model_files(str(tmp_path))] == ["chat"]
    assert sorted(skipped(caplog)) == [str(tmp_path / "empty.gguf"), str(tmp_path / "notes.gguf")]


def test_with_only_stray_files_the_demo_is_served(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="service.models.model_file")
    (tmp_path / "notes.gguf").write_text("not a model")
    demo, = model_files(str(tmp_path))
    assert demo.is_demo and skipped(caplog) == [str(tmp_path / "notes.gguf")]


def test_the_demo_model_takes_an_agents_long_prompt(tmp_path):
    demo, = model_files(str(tmp_path))
    # Claude Code sends ~11k tokens, Codex 17k-25k: LLAMA_CTX=65536 must not be capped to a short trained context.
    assert trained_context(demo.path) == CONTEXT_LENGTH
    assert fit_context(demo.name, demo.path, 65536) == 65536


def test_a_demo_an_older_checkout_kept_is_written_again(tmp_path, monkeypatch):
    kept = str(tmp_path / DEMO_MODEL_NAME)
    with monkeypatch.context() as older:
        older.setattr(demo_model, "DEMO_VERSION", "1")
        older.setattr(demo_model, "CONTEXT_LENGTH", 4096)
        write_demo_model(kept)
    assert not is_current_demo(kept)
    demo, = model_files(str(tmp_path))
    assert demo.path == kept and is_current_demo(kept) and trained_context(kept) == CONTEXT_LENGTH
    # A current one is kept as it is.
    written = os.stat(kept).st_mtime_ns
    model_files(str(tmp_path))
    assert os.stat(kept).st_mtime_ns == written


@pytest.mark.parametrize("written, said", [
    ("owner/repo", "no such model file: {cwd}/owner/repo; for a model on Hugging Face write hf:owner/repo"),
    ("owner/repo:Q4_K_M", "no such model file: {cwd}/owner/repo:Q4_K_M; for a model on Hugging Face write "
                          "hf:owner/repo:Q4_K_M"),
    ("models/llama.gguf", "no such model file: {cwd}/models/llama.gguf"),  # a path, not a name on the Hub
    ("{tmp}", "{tmp} is a folder; name a .gguf file in it, or set MODELS_DIR={tmp} instead to serve every .gguf "
              "there"),
])
def test_a_model_file_setting_that_names_no_file_says_what_to_write(tmp_path, monkeypatch, written, said):
    monkeypatch.chdir(tmp_path)
    written, said = (text.format(cwd=tmp_path, tmp=tmp_path) for text in (written, said))
    with pytest.raises(ValueError) as failed:
        local_model_path(written)
    assert str(failed.value) == said
    with pytest.raises(LlamaStartError) as failed:
        resolve(written, str(tmp_path))
    assert str(failed.value) == said


def test_a_model_file_that_exists_is_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert local_model_path("m.gguf") == resolve("m.gguf") == str(tmp_path / "m.gguf")
