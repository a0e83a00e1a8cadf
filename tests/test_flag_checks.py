"""What the gateway checks in a model's args before it starts llama.cpp: flags it sets itself (owned), each named
with the models file's key to use instead, a value written after `=` refused unseen, and the table's checks skipped
for a llama-server program of the user's own."""
import pytest
import xllamacpp

from service.llama.flags import FLAGS, FlagError, apply, check_user_args, command_line, owned


@pytest.mark.parametrize("token", ["--api-key=sk-SECRET", "--hf-token=sk-SECRET", "-hft=sk-SECRET", "--nope=sk-SECRET",
                                   "--jinja=sk-SECRET"])
def test_a_value_written_after_an_equals_sign_is_refused_and_never_shown_for_a_binary_too(token):
    # llama.cpp takes no --flag=value form and would quote the whole token; the value may be a key
    name = token.split("=")[0]
    for binary in (False, True):
        [message] = check_user_args(["--jinja", token], "qwen", binary=binary)
        assert message.startswith(f"models.qwen.args: {name}") and "SECRET" not in message
    with pytest.raises(FlagError) as caught:
        apply(xllamacpp.CommonParams(), [token])  # the child's refusal line
    assert caught.value.flag == name and "SECRET" not in str(caught.value)
    assert "SECRET" not in command_line([token]) + command_line(["-hft", "sk-SECRET"])


def test_owned_flags_are_the_ones_the_gateway_sets_itself():
    found = owned(["--port", "1", "-ngl", "9", "-a", "x", "--metrics", "--jinja", "-c", "8"])
    assert [error.flag for error in found] == ["--port", "-a", "--metrics", "-c"]
    assert all("set by the gateway" in str(error) for error in found)
    assert sorted(flag.names[0] for flag in FLAGS if flag.owner) == [
        "--alias", "--api-key", "--api-key-file", "--api-prefix", "--ctx-size", "--docker-repo", "--embeddings",
        "--hf-file", "--hf-repo", "--hf-repo-draft", "--host", "--metrics", "--mmproj", "--model", "--model-url",
        "--models-dir", "--models-preset", "--parallel", "--path", "--port", "--rerank", "--reuse-port",
        "--spec-draft-model", "--ssl-cert-file", "--ssl-key-file", "--threads"]


# A model's own args that set what the gateway sets: the models file's key to use instead, or none at all.
OWNED = [
    (["--ctx-size", "8192"], "--ctx-size", "ctx"), (["-c", "8192"], "-c", "ctx"),
    (["--parallel", "4"], "--parallel", "parallel"), (["-np", "4"], "-np", "parallel"),
    (["--threads", "8"], "--threads", "threads"), (["-t", "8"], "-t", "threads"),
    (["--embeddings"], "--embeddings", "embeddings"), (["--reranking"], "--reranking", "rerank"),
    (["--model", "x.gguf"], "--model", "source"), (["-m", "x.gguf"], "-m", "source"),
    (["--mmproj", "p.gguf"], "--mmproj", "mmproj"), (["--model-draft", "d.gguf"], "--model-draft", "draft"),
    (["-md", "d.gguf"], "-md", "draft"), (["--alias", "x"], "--alias", "aliases"),
    (["--port", "8081"], "--port", None), (["--host", "0.0.0.0"], "--host", None), (["--metrics"], "--metrics", None),
    (["--ctx-size", "lots"], "--ctx-size", "ctx"),  # its value bad too: one message, the key to use
    (["--ctx-size=8192"], "--ctx-size", "ctx"),  # written with =: one message, the key to use
    # flags that would move llama.cpp's API away from the gateway, or load another model than the one it fetched
    (["--api-prefix", "/v"], "--api-prefix", None), (["--ssl-key-file", "k.pem"], "--ssl-key-file", None),
    (["--ssl-cert-file", "c.pem"], "--ssl-cert-file", None), (["--api-key-file", "k"], "--api-key-file", None),
    (["--reuse-port"], "--reuse-port", None), (["--path", "/srv"], "--path", None),
    (["--models-dir", "/m"], "--models-dir", None), (["--models-preset", "p.ini"], "--models-preset", None),
    (["-hf", "o/r"], "-hf", "source"), (["-hfr", "o/r:Q4_K_M"], "-hfr", "source"),
    (["--hf-file", "x.gguf"], "--hf-file", "source"), (["-hfd", "o/r"], "-hfd", "draft"),
    (["-mu", "https://x/m.gguf"], "-mu", None), (["-dr", "gemma3"], "-dr", None),
]


@pytest.mark.parametrize("args, flag, key", OWNED, ids=[" ".join(case[0]) for case in OWNED])
def test_a_flag_the_gateway_sets_names_the_model_and_the_key_to_use(args, flag, key):
    for binary in (False, True):
        [message] = check_user_args(["--jinja", *args], "qwen", binary=binary)
        assert message.startswith(f"models.qwen.args: {flag} is set by the gateway (")
        if key:
            assert message.endswith(f"use the models file's key {key} instead")
        else:
            assert message.endswith("remove it") and "models file's key" not in message


def test_the_parallel_message_names_parallel_not_slots():
    [message] = check_user_args(["-np", "4"], "qwen")
    assert "key parallel instead" in message and "slots" not in message


def test_unknown_flags_and_bad_values_are_checked_against_the_table_but_not_for_a_binary():
    args = ["--n-gpu-layers", "99", "--flash-atn", "on", "-ctk", "q9", "--port", "1"]
    messages = check_user_args(args, "qwen")
    assert [message.split(": ", 2)[1].split()[0] for message in messages] == ["--port", "unknown", "-ctk"]
    assert all(message.startswith("models.qwen.args: ") for message in messages)
    assert "unknown flag --flash-atn (did you mean --flash-attn?); known flags: " in messages[1]
    # A llama-server program may be newer than the table: its own flags are its to judge.
    [message] = check_user_args(args, "qwen", binary=True)
    assert message.startswith("models.qwen.args: --port is set by the gateway")
    assert check_user_args(["-ngl", "99", "-fa", "on", "--cache-type-k", "q8_0"], "qwen") == []


def test_without_a_model_id_the_messages_are_bare_for_the_models_file_to_place():
    assert check_user_args(["-c", "1"]) == ["-c is set by the gateway (it budgets memory by it): use the models "
                                            "file's key ctx instead"]
