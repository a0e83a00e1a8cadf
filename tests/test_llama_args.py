"""A model's own llama-server args through the supervisor: after the gateway's flags, verbatim to a binary, applied
by the xllamacpp child through the flag table (a flag it cannot take fails the start in one line naming it), and on
a real llama.cpp: a quantised KV cache with flash attention, and a draft model for speculative decoding."""
import os
import re

import pytest
import requests

from service.llama import child
from service.llama.flags import FlagError
from service.llama.supervisor import LlamaSupervisor
from service.models.demo_model import write_demo_model
from service.models.errors import LlamaStartError


def test_args_come_after_the_gateway_s_flags_and_reach_a_binary_verbatim():
    args = ["--n-gpu-layers", "99", "--some-newer-flag", "x y", "--mmproj", "/m/p.gguf"]
    binary = LlamaSupervisor("/m/x.gguf", port=8090, binary="/opt/llama-server", args=args)
    assert binary.command()[:5] == ["/opt/llama-server", "--model", "/m/x.gguf", "--host", "127.0.0.1"]
    assert binary.command()[-len(args):] == args
    embedded = LlamaSupervisor("/m/x.gguf", port=8090, args=args).command()
    assert embedded[-len(args) - 1:] == [*args, "--exit-with-stdin"]
    quoted = '"x y"' if os.name == "nt" else "'x y'"
    assert binary.command_line.endswith(f"--some-newer-flag {quoted} --mmproj /m/p.gguf")


@pytest.mark.parametrize("args, said", [
    (["--flash-atn", "on"], r"unknown flag --flash-atn \(did you mean --flash-attn\?\); known flags: --batch-size .*"),
    (["-ngl", "lots"], r"-ngl: bad value 'lots': not a whole number \(expected N\|auto\|all\)"),
    # xllamacpp prints its buffer types first: the child's own line still leads
    (["-ot", "blk=NO_SUCH_BUFFER"], r"-ot: llama.cpp refused it: unknown buffer type"),
    # a value after = may be a key: the line names the flag alone
    (["--hf-token=hf_SECRET"], r"--hf-token=\.\.\.: llama\.cpp takes no --hf-token=VALUE form: write the flag and "
                               r"its value as two strings"),
])
def test_a_flag_the_child_cannot_take_fails_the_start_with_one_line_naming_it(tmp_path, args, said):
    supervisor = LlamaSupervisor(str(tmp_path / "never-read.gguf"), ctx=512, parallel=1, embeddings=False,
                                 startup_timeout=30, args=args)
    with pytest.raises(LlamaStartError) as failed:
        supervisor.start()
    assert re.fullmatch(r"llama\.cpp exited with code 2 while loading never-read\.gguf: " + said +
                        r" \(LOG_LEVEL=debug logs all it printed\)", str(failed.value)), str(failed.value)


def test_the_child_keeps_its_context_default_and_needs_a_model():
    assert child.server_params(["--model", "/m/x.gguf"]).n_ctx == 4096  # not the model's whole trained context
    assert child.server_params(["-m", "/m/x.gguf", "-c", "1024"]).n_ctx == 1024
    with pytest.raises(FlagError, match="--model is required"):
        child.server_params(["--ctx-size", "1024"])


@pytest.mark.llama
def test_the_child_applies_args_after_the_gateway_s_own_flags(demo_model_path):
    # A model's args win where they set what the gateway set (here the context), and reach llama.cpp (no /slots).
    supervisor = LlamaSupervisor(demo_model_path, ctx=512, parallel=1, threads=1, embeddings=False,
                                 startup_timeout=30, args=["--ctx-size", "1024", "--no-slots"]).start()
    try:
        props = requests.get(supervisor.url + "/props", timeout=5).json()
        assert props["default_generation_settings"]["n_ctx"] == 1024
        assert requests.get(supervisor.url + "/slots", timeout=5).status_code == 501
    finally:
        supervisor.stop()


@pytest.mark.llama
def test_a_supervisor_with_args_runs_a_quantised_kv_cache_and_a_draft_model(tmp_path):
    # q8_0 KV needs a head size that is a multiple of 32: 128 wide over 4 heads. The draft shares the vocabulary.
    model = write_demo_model(str(tmp_path / "wide.gguf"), embedding_size=128)
    draft = write_demo_model(str(tmp_path / "draft.gguf"), seed=1)
    args = ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "-fa", "on", "--model-draft", draft,
            "--draft-max", "4"]
    supervisor = LlamaSupervisor(model, ctx=512, parallel=1, threads=1, embeddings=False, startup_timeout=50,
                                 args=args).start()
    try:
        answer = requests.post(supervisor.url + "/v1/completions", json={
            "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}, timeout=50)
        assert answer.status_code == 200, answer.text
        timings = answer.json()["timings"]
        assert timings.get("draft_n", 0) > 0, timings  # the draft model drafted
    finally:
        supervisor.stop()
