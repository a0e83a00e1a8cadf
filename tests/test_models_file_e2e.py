"""The models file end to end: bin/serve reads MODELS_FILE and runs each model as written, with the stand-in
llama-server (tests/fake_llama_server.py) recording its command line and the bodies it gets; bad files stop the
start and --check with one line each; a real llama.cpp runs a quantised KV cache and a draft model from the file.
Reloads are in test_models_file_live.py."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import requests

from service.llama.supervisor import free_port
from service.models.demo_model import write_demo_model
from tests import fake_llama_server as stand_in
from tests.fake_hub import projector_gguf
from tests.processes import SERVE, ServeProcess

@pytest.fixture
def box(tmp_path, monkeypatch):
    """A Box; the test run's own model settings are kept from bin/serve (ServeProcess passes os.environ on)."""
    for name in stand_in.MODEL_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return stand_in.Box(tmp_path)


def run_serve(env, *args, port=None) -> subprocess.CompletedProcess:
    """bin/serve run to its end (a start that fails, or --check), with API_PORT port (default: a free one)."""
    clean = {key: value for key, value in os.environ.items() if key not in stand_in.MODEL_SETTINGS}
    try:
        return subprocess.run([sys.executable, SERVE, *args], capture_output=True, text=True, timeout=30,
                              env={**clean, "API_PORT": str(port or free_port()), **env})
    except subprocess.TimeoutExpired as running:  # it started serving instead of stopping (ended by run)
        printed = (running.stderr or b"").decode("utf-8", "replace")
        pytest.fail(f"bin/serve {' '.join(args)} did not end; it printed:\n{printed[-3000:]}")


def request_lines(serve, ids, timeout=20) -> dict:
    """The request log lines of the given x-request-ids, by id, once all are written."""
    found = {}
    while True:
        for line in serve.seen:
            entry = json.loads(line)
            if entry.get("event") == "request" and entry.get("request_id") in ids:
                found[entry["request_id"]] = entry
        if set(found) == set(ids):
            return found
        serve.wait_for_event("request", timeout)


@pytest.fixture(scope="module")
def projector(tmp_path_factory):
    """A small projector GGUF (general.architecture "clip"), as a local file."""
    path = tmp_path_factory.mktemp("projector") / "mmproj-vision-f16.gguf"
    path.write_bytes(projector_gguf(tmp_path_factory))
    return path


ARGS = ["-ngl", "99", "--flash-attn", "on", "--cache-type-k", "q8_0", "--override-tensor", r"blk\.0\.ffn_up_exps=CPU",
        "--chat-template-kwargs", '{"enable_thinking": false}', "--jinja"]


def test_args_projector_and_draft_reach_llama_server_as_written_after_the_gateways_own(box, demo_model_path,
                                                                                     projector):
    shutil.copy(demo_model_path, box.root / "vision.gguf")
    shutil.copy(demo_model_path, box.root / "draft.gguf")
    shutil.copy(projector, box.root / "mmproj-vision-f16.gguf")
    # Relative paths are from the models file's folder, wherever bin/serve runs.
    box.file.write_text(f"""
[models.vision]
source = "vision.gguf"
mmproj = "mmproj-vision-f16.gguf"
draft = "draft.gguf"
args = [{", ".join(stand_in.quoted(arg) for arg in ARGS)}]
""")
    serve = ServeProcess(**box.env())
    try:
        serve.wait_for_event("ready")
        listed = requests.get(serve.url + "/v1/models", timeout=10).json()["data"]
    finally:
        assert serve.stop() == 0
    assert [(model["id"], model.get("capabilities")) for model in listed] == [("vision", ["vision"])]
    process, = box.processes()
    argv = process["argv"]
    start = next((at for at in range(len(argv)) if argv[at:at + len(ARGS)] == ARGS), None)
    assert start is not None, f"the args are not in llama-server's argv as written: {argv}"
    own = argv[:start]  # the gateway's flags first: a user's args come after them, as llama-server reads them
    assert stand_in.flag(own, "--model") == str(box.root / "vision.gguf")
    assert stand_in.flag(own, "--alias") == "vision" and "--port" in own and "--host" in own
    assert argv[start + len(ARGS):] == ["--mmproj", str(box.root / "mmproj-vision-f16.gguf"),
                                        "--model-draft", str(box.root / "draft.gguf")]


RULED = """
[models.chat]
source = {source}
aliases = ["gpt-4o-mini"]

[models.chat.defaults]
temperature = 0.7
chat_template_kwargs = {{ enable_thinking = false }}

[models.chat.limits]
max_tokens = 16
strip = ["logit_bias"]

[models.plain]
source = {source}
"""

# Per API family: the path, the client's body (model, limit and the fields a rule touches added per request), and
# the field its output limit is in.
FAMILIES = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    "completions": ("/v1/completions", {"prompt": "hi"}, "max_tokens"),
    "responses": ("/v1/responses", {"input": "hi"}, "max_output_tokens"),
    "messages": ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
}
# The last event of each family's stream.
ENDS = {"chat": "data: [DONE]", "completions": "data: [DONE]", "responses": "event: response.completed",
        "messages": "event: message_stop"}
# What each request sends: the model name, its output limit (None: none), whether it streams, its temperature.
ASKS = [("chat", "gpt-4o-mini", 100, False, None), ("completions", "chat", None, True, 0.2),
        ("responses", "chat", 50, True, None), ("messages", "gpt-4o-mini", 1000, False, None),
        ("chat", "chat", 8, True, None)]


def test_defaults_ceilings_strips_and_aliases_reach_llama_server_in_every_family(box, demo_model_path):
    box.file.write_text(RULED.format(source=stand_in.quoted(demo_model_path)))
    serve = ServeProcess(**box.env())
    try:
        serve.wait_for_event("ready")
        for number, (family, model, limit, stream, temperature) in enumerate(ASKS):
            path, fields, limit_field = FAMILIES[family]
            body = {"model": model, **fields, "stream": stream, "logit_bias": {"42": 1},
                    "chat_template_kwargs": {"x": 1}}
            body.update({limit_field: limit} if limit is not None else {})
            body.update({"temperature": temperature} if temperature is not None else {})
            answer = requests.post(serve.url + path, json=body, timeout=20, headers={
                "x-request-id": f"ask-{number}", "anthropic-version": "2023-06-01"})
            assert answer.status_code == 200, answer.text
            if stream:  # the stream's last event reached the client
                assert ENDS[family] in answer.text, answer.text
            else:
                assert answer.json()["model"] == model  # answered under the name sent
        plain = requests.post(serve.url + "/v1/chat/completions", timeout=20, json={
            "model": "plain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
            "logit_bias": {"42": 1}})
        assert plain.status_code == 200
        unknown = requests.post(serve.url + "/v1/chat/completions", timeout=20, json={
            "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        logged = request_lines(serve, [f"ask-{number}" for number in range(len(ASKS))])
    finally:
        assert serve.stop() == 0
    chat, = box.processes("chat")
    received = [body for _, body in chat["bodies"]]
    assert [path for path, _ in chat["bodies"]] == [FAMILIES[ask[0]][0] for ask in ASKS]
    for (family, model, limit, stream, temperature), body in zip(ASKS, received):
        limit_field = FAMILIES[family][2]
        assert body[limit_field] == min(limit or 16, 16), family  # lowered to the ceiling, or set to it
        assert body["temperature"] == (temperature or 0.7), family  # a client's own value wins over the default
        assert "logit_bias" not in body, family  # stripped
        assert body["chat_template_kwargs"] == {"x": 1, "enable_thinking": False}, family  # merged
        assert body["stream"] is stream
    lowered = {request_id: line.get("max_tokens_lowered_from") for request_id, line in logged.items()}
    assert lowered == {"ask-0": 100, "ask-1": None, "ask-2": 50, "ask-3": 1000, "ask-4": None}
    plain_process, = box.processes("plain")
    (_, plain_body), = plain_process["bodies"]  # a model without rules gets the client's body as it was, but for
    # the slot the gateway gave it (it owns the slots of the models it runs: warm conversations)
    assert plain_body.pop("id_slot") in (0, 1)
    assert plain_body == {"model": "plain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
                          "logit_bias": {"42": 1}}


BAD_FILES = {
    "a syntax error": ('[models.chat]\nsource = {source}\nctx = \n', 3, ""),
    "an unknown key": ('[models.chat]\nsource = {source}\ncontex = 4096\n', 3, "models.chat.contex: unknown key"),
    "neither source nor upstreams": ('[models.chat]\nctx = 512\n', 1, "models.chat: needs a source"),
    "an alias naming another model": ('[models.chat]\nsource = {source}\n\n[models.embed]\nsource = {source}\n'
                                      'aliases = ["chat"]\n', 6, "models.embed.aliases: chat already names model chat"),
    "a negative ttl": ('[models.chat]\nsource = {source}\nttl = -5\n', 3, "models.chat.ttl: must be a number of "
                       "seconds, 0 or more"),
}


@pytest.mark.parametrize("text, line, words", BAD_FILES.values(), ids=list(BAD_FILES))
def test_a_bad_models_file_stops_the_start_with_one_line_naming_file_and_line(box, demo_model_path, text, line,
                                                                             words):
    box.file.write_text(text.format(source=stand_in.quoted(demo_model_path)))
    result = run_serve(box.env())
    assert result.returncode == 1
    said = [said_line for said_line in result.stderr.splitlines() if said_line.strip()]
    assert len(said) == 1, result.stderr
    assert f"{box.file}:{line}: {words}" in said[0]
    assert box.processes() == []  # no llama-server was started


def test_check_prints_each_models_command_line_and_starts_nothing(box, demo_model_path, projector):
    box.file.write_text(f"""
[models.local]
source = {stand_in.quoted(demo_model_path)}
mmproj = {stand_in.quoted(projector)}
args = ["--n-gpu-layers", "99", "--flash-attn", "on"]

[models.hub]
source = "hf:ggml-org/gemma-3-1b-it-GGUF:Q4_K_M"

[models.remote]
upstreams = ["http://127.0.0.1:9"]
""")
    # Its port held by another program: a start would stop at once (API_PORT in use); a check binds nothing.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        result = run_serve(box.env(), "--check", port=taken.getsockname()[1])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    local = next((line for line in out.splitlines() if str(demo_model_path) in line), None)
    assert local is not None, out
    assert f"--n-gpu-layers 99 --flash-attn on --mmproj {projector}" in local  # the full command line
    assert "hf:ggml-org/gemma-3-1b-it-GGUF:Q4_K_M" in out  # shown as written: nothing downloaded
    assert "remote" in out and "http://127.0.0.1:9" in out
    assert box.processes() == [] and list(box.models_dir.iterdir()) == []  # nothing started, nothing fetched


def test_check_names_an_unknown_flag_in_one_line_and_exits_1(box, demo_model_path):
    box.file.write_text(f'[models.chat]\nsource = {stand_in.quoted(demo_model_path)}\n'
                        'args = ["-fa", "on", "--n-gpu-layer", "9"]\n')
    result = run_serve(box.env(binary=False), "--check")
    assert result.returncode == 1
    said = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(said) == 1, said
    assert f"{box.file}:3: models.chat.args: unknown flag --n-gpu-layer (did you mean --n-gpu-layers?)" in said[0]


def test_an_unknown_flag_stops_the_embedded_start_with_its_one_line(box, demo_model_path):
    box.file.write_text(f'[models.chat]\nsource = {stand_in.quoted(demo_model_path)}\nargs = ["--no-such-flag"]\n')
    result = run_serve(box.env(binary=False))
    assert result.returncode == 1
    said = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(said) == 1, result.stderr
    assert f"{box.file}:3: models.chat.args: unknown flag --no-such-flag" in said[0]
    assert "known flags: " in said[0]


@pytest.mark.llama
def test_llama_cpp_runs_the_files_kv_cache_flags_and_draft_model(box):
    # q8_0 KV needs a head size that is a multiple of 32: 128 wide over 4 heads. The draft shares the vocabulary.
    write_demo_model(str(box.root / "wide.gguf"), embedding_size=128)
    write_demo_model(str(box.root / "draft.gguf"), seed=1)
    box.file.write_text("""
[models.wide]
source = "wide.gguf"
draft = "draft.gguf"
ctx = 512
parallel = 1
args = ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "-fa", "on", "--spec-draft-n-max", "4", "-lv", "4"]
""")
    serve = ServeProcess(**box.env(binary=False, LLAMA_EMBEDDINGS="0", LOG_LEVEL="debug"))
    try:
        serve.wait_for_event("ready", timeout=50)
        answer = requests.post(serve.url + "/v1/chat/completions", timeout=50, json={
            "model": "wide", "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 16,
            "temperature": 0})
    finally:
        assert serve.stop() == 0
    assert answer.status_code == 200, answer.text
    assert answer.json()["timings"]["draft_n"] > 0  # the draft model drafted
    # The context llama.cpp built, in its own words (LOG_LEVEL=debug logs them; -lv 4 has it say them).
    built = " ".join(json.loads(line).get("line", "") for line in serve.seen)
    assert "K (q8_0)" in built and "V (q8_0)" in built and re.search(r"flash_attn\s+= enabled", built)
