"""bin/serve itself: starts (embedded and external), reports ready, answers, and leaves no process behind."""
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from service.llama.supervisor import free_port
from service.serve import check_listen_address, warn_unknown_settings
from tests.processes import ROOT, SERVE, ServeProcess, posix_only


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is as good as gone: it only waits to be reaped.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def wait_gone(pid, timeout=10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


@posix_only
@pytest.mark.llama
def test_embedded_start_answers_and_sigterm_leaves_no_child(demo_model_path):
    serve = ServeProcess(LLAMA_MODEL=demo_model_path, LLAMA_CTX="1024", LLAMA_THREADS="1")
    try:
        ready = serve.wait_for_event("ready")
        assert ready["base_url"] == serve.url + "/v1"
        replica, = ready["models"][0]["replicas"]
        assert ready["models"][0]["name"] == "any" and replica["kind"] == "embedded llama.cpp via xllamacpp"
        assert replica["model_source"] == "LLAMA_MODEL" and ready["open_access"] is True
        child_pid = replica["pid"]
        assert requests.get(serve.url + "/health", timeout=10).status_code == 200
        chat = requests.post(serve.url + "/v1/chat/completions", timeout=30, json={
            "model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 3
        assert pid_alive(child_pid)
    finally:
        code = serve.stop()
    assert code == 0
    assert serve.wait_for_event("llama.cpp stopped")["pid"] == child_pid
    serve.wait_for_event("stopped")
    assert wait_gone(child_pid), "llama.cpp outlived the gateway"


@posix_only
@pytest.mark.llama
def test_killed_gateway_takes_its_child_along(demo_model_path):
    serve = ServeProcess(LLAMA_MODEL=demo_model_path, LLAMA_CTX="512", LLAMA_THREADS="1", LOG_FORMAT="text")
    try:
        child_pid = int(serve.wait_for(r"embedded llama.cpp via xllamacpp, pid (\d+)").group(1))
        serve.wait_for(r"WARNING: no API key is configured")
    finally:
        serve.stop(signal.SIGKILL)
    assert wait_gone(child_pid), "llama.cpp was orphaned by a SIGKILLed gateway"


@posix_only
@pytest.mark.llama
def test_external_upstream_only_proxies(llama):
    serve = ServeProcess(LLAMA_SERVER_URL=llama.url, LOG_FORMAT="text")
    try:
        serve.wait_for(r"model any: %s \(external llama-server\)" % re.escape(llama.url))
        assert requests.get(serve.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "demo"
    finally:
        assert serve.stop() == 0


@posix_only
@pytest.mark.llama
def test_serve_llama_starts_only_llama(demo_model_path):
    port = free_port()
    serve = ServeProcess(os.path.join(ROOT, "bin", "serve-llama"), LLAMA_MODEL=demo_model_path, LLAMA_PORT=str(port),
                         LLAMA_CTX="512", LLAMA_THREADS="1", LLAMA_EMBEDDINGS="0", LOG_FORMAT="text")
    try:
        serve.wait_for(r"llama.cpp ready on http://127.0.0.1:%d" % port)
        serve.wait_for(r"LLAMA_SERVER_URL=http://127.0.0.1:%d python bin/serve" % port)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        # Embeddings were switched off by LLAMA_EMBEDDINGS=0: llama.cpp itself says so.
        assert requests.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "x"}, timeout=10).status_code \
            == 501
    finally:
        assert serve.stop() == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=2)


@posix_only
@pytest.mark.llama
def test_several_models_each_get_their_own_llama(demo_model_path, tmp_path):
    import openai

    from service.models.demo_model import write_demo_model

    other = write_demo_model(str(tmp_path / "other.gguf"), seed=1)
    serve = ServeProcess(MODEL_PATHS=f"chat={demo_model_path},embed={other}", MODEL_SETTINGS="embed:ctx=512",
                         LLAMA_THREADS="1", LLAMA_CTX="1024")
    try:
        ready = serve.wait_for_event("ready")
        assert [model["name"] for model in ready["models"]] == ["chat", "embed"]
        pids = [model["replicas"][0]["pid"] for model in ready["models"]]
        assert len(set(pids)) == 2 and all(pid_alive(pid) for pid in pids)
        client = openai.OpenAI(base_url=serve.url + "/v1", api_key="none", max_retries=0, timeout=30)
        assert [model.id for model in client.models.list()] == ["chat", "embed"]
        answer = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2)
        assert answer.model == "chat"
        vectors = client.embeddings.create(model="embed", input="hi")
        assert vectors.model == "embed" and len(vectors.data[0].embedding) == 64
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        n_ctx = {model.id: model.model_extra["meta"]["n_ctx"] for model in client.models.list()}
        # MODEL_SETTINGS gave embed its own context size; llama.cpp reports it per slot (LLAMA_PARALLEL=2).
        assert n_ctx == {"chat": 1024 // 2, "embed": 512 // 2}
    finally:
        assert serve.stop() == 0
    assert all(wait_gone(pid) for pid in pids)


KEY, PASSWORD = "sk-gateway-test-0123456789", "pa55-w0rd-not-for-logs"


@pytest.mark.parametrize("log_format, ready, level", [
    ("json", r'"event": "ready"', "DEBUG"),
    ("text", r"llama.cpp gateway ready on", "INFO"),
])
def test_nothing_it_prints_holds_the_llama_key_or_a_url_password(httpserver, log_format, ready, level):
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    httpserver.expect_request("/v1/models").respond_with_json({"object": "list", "data": []})
    upstream = httpserver.url_for("").rstrip("/")
    serve = ServeProcess(LLAMA_SERVER_URL=upstream.replace("http://", f"http://alice:{PASSWORD}@"),
                         LLAMA_API_KEY=KEY, LOG_FORMAT=log_format, LOG_LEVEL=level, with_stdout=True)
    try:
        serve.wait_for(ready)
        # Some upstream calls, answered and not (no handler: 500), for the lines they log.
        assert requests.get(serve.url + "/health", timeout=10).status_code == 200
        assert requests.get(serve.url + "/v1/models", timeout=10).status_code == 200
        requests.post(serve.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                      timeout=10)
    finally:
        serve.stop()
    output = serve.output()
    assert KEY not in output and PASSWORD not in output and "alice" not in output
    assert upstream in output  # the URL itself is shown, without its credentials
    assert len(httpserver.log) >= 3  # the calls reached the llama-server: their lines are in the output


@pytest.mark.parametrize("env, words", [
    ({"API_PORT": "abc"}, "error: API_PORT: must be a whole number"),
    # Per-model settings for a model that does not exist (the demo's name is not "llama").
    ({"MODEL_SETTINGS": "llama:rerank=on"}, "error: MODEL_SETTINGS: no model named llama; the models are: "),
    ({"MODEL_UPSTREAMS": "chat=http://127.0.0.1:9", "MODEL_SETTINGS": "chta:slots=2"},
     "error: MODEL_SETTINGS: no model named chta; the models are: chat"),
    ({"MODEL_UPSTREAMS": "chat=http://127.0.0.1:9", "ENABLED_MODELS": "chat"},
     "error: ENABLED_MODELS: no model named chat; the models are: none that bin/serve starts"),
    ({"CHAT_READ_TIMEOUT_S": "-5"}, "error: CHAT_READ_TIMEOUT_S: must be a number of seconds above 0"),
    ({"LLAMA_MODEL": "/no/such.gguf"}, "error: LLAMA_MODEL: no such model file"),
    ({"ENABLED_MODELS": "nope"}, "error: ENABLED_MODELS: no model named nope; the models are: "),
    ({"LLAMA_SERVER_URL": f"http://alice:{PASSWORD}@127.0.0.1:80x"}, "error: LLAMA_SERVER_URL: has a bad port: "
     "'http://127.0.0.1:80x'"),
])
def test_bad_settings_stop_the_start_with_one_line(env, words):
    # A free port: the gateway's own (8000) may be in use on this machine, which is refused first.
    result = subprocess.run([sys.executable, SERVE], env={**os.environ, "API_PORT": str(free_port()), **env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(words)


def test_a_port_in_use_is_named_before_any_model_loads(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, SERVE], env={**os.environ, "API_PORT": str(port),
                                                              "MODELS_DIR": str(tmp_path)},
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: API_PORT: {port} is in use on 127.0.0.1 (another program "
                                          "listens there); choose a free port"]
    assert list(tmp_path.iterdir()) == []  # not even the demo model was written


def test_the_start_warns_once_of_what_would_go_unnoticed():
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    serve = ServeProcess(LLAMA_SERVER_URL=dead, RATE_LIMT_RPM="5", LOG_FORMAT="text")
    try:
        serve.wait_for(r"llama.cpp gateway ready on")  # not refused: the upstream may come up later
    finally:
        assert serve.stop() == 0
    lines = serve.output().splitlines()
    typo = [line for line in lines if "RATE_LIMT_RPM" in line]
    assert len(typo) == 1 and "WARNING unknown setting ignored name=RATE_LIMT_RPM did_you_mean=RATE_LIMIT_RPM " \
        "source=environment" in typo[0]
    upstream = [line for line in lines if "/health" in line]
    assert len(upstream) == 1 and f"WARNING upstream does not answer /health url={dead} " in upstream[0]
    assert len([line for line in lines if "no API key" in line]) == 1  # the banner's, not a log line besides


def test_unknown_settings_name_the_file_they_came_from(tmp_path, caplog):
    env_file = tmp_path / ".env"
    env_file.write_text("MODELS_DIRS=/srv/models\n")
    with caplog.at_level(logging.WARNING, logger="service"):
        # As after load_dotenv: the file's entries are in the environment too.
        warn_unknown_settings({"MODELS_DIRS": "/srv/models", "LLAMA_THRADS": "4", "PATH": "/bin"}, str(env_file))
    assert [record.fields for record in caplog.records] == [
        {"name": "MODELS_DIRS", "did_you_mean": "MODELS_DIR", "source": ".env", "settings": ".env.example"},
        {"name": "LLAMA_THRADS", "did_you_mean": "LLAMA_THREADS", "source": "environment", "settings": ".env.example"}]


@pytest.mark.parametrize("windows", [True, False])
def test_the_api_port_is_probed_as_waitress_binds_there(windows):
    # Windows: with no option at all (an exclusive bind fails while old connections linger, where waitress's own
    # bind succeeds). A port another program listens on is refused all the same.
    check_listen_address("127.0.0.1", free_port(), windows=windows)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(SystemExit) as stopped:
            check_listen_address("127.0.0.1", taken.getsockname()[1], windows=windows)
    assert stopped.value.code == 2


def run_serve(*args, **env):
    """bin/serve run to its end, with env over the test's environment (the venv's Python: no re-exec)."""
    return subprocess.run([sys.executable, SERVE, *args], env={**os.environ, "API_PORT": str(free_port()), **env},
                          capture_output=True, text=True, timeout=60)


def models_file(folder, text) -> str:
    """A models file in folder, beside stand-ins for the files it names (the file's reader checks they exist)."""
    for name in ("model.gguf", "mmproj-F16.gguf", "draft.gguf"):
        (folder / name).write_bytes(b"GGUF")
    path = folder / "models.toml"
    path.write_text(text)
    return str(path)


CHECKED = """[models.chat]
source = "model.gguf"
aliases = ["gpt-4o-mini"]
args = ["-ngl", "99", "--cache-type-k", "q8_0"]
mmproj = "mmproj-F16.gguf"
draft = "draft.gguf"
[models.far]
upstreams = ["http://alice:pw@far:8080"]
"""


def test_check_prints_each_model_with_its_command_line_and_starts_nothing(tmp_path):
    path = models_file(tmp_path, CHECKED)
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a start would stop here: the API port is in use
        result = run_serve("--check", MODELS_FILE=path, MODELS_DIR=str(tmp_path / "kept"),
                           API_PORT=str(taken.getsockname()[1]))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == [f"models from {path}:", "model chat (aliases gpt-4o-mini)"]
    command = lines[2].split()
    assert command[command.index("--model") + 1] == str(tmp_path / "model.gguf")
    assert command[command.index("--alias") + 1] == "chat"
    tail = command[command.index("-ngl"):]
    assert tail == ["-ngl", "99", "--cache-type-k", "q8_0", "--mmproj", str(tmp_path / "mmproj-F16.gguf"),
                    "--model-draft", str(tmp_path / "draft.gguf"), "--exit-with-stdin"]
    assert lines[3:] == ["model far", "  llama-server at http://far:8080"]  # never a password
    assert not (tmp_path / "kept").exists()  # nothing fetched, no demo written


def test_check_and_the_start_print_every_problem_of_a_models_file_and_exit_1(tmp_path):
    path = models_file(tmp_path, CHECKED.replace('"-ngl"', '"-c", "8", "--bogus"') + "ttl = -1\n")
    expected = [f"{path}:4: models.chat.args: -c is set by the gateway",
                f"{path}:4: models.chat.args: unknown flag --bogus", f"{path}:9: models.far.ttl: must be"]
    for args in (["--check"], []):
        result = run_serve(*args, MODELS_FILE=path)
        assert result.returncode == 1 and result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == len(expected) and all(line.startswith(start) for line, start in zip(lines, expected))


def test_a_models_file_beside_a_setting_that_names_models_stops_the_start_with_one_line(tmp_path):
    path = models_file(tmp_path, CHECKED)
    result = run_serve(MODELS_FILE=path, MODEL_PATHS=f"x={tmp_path / 'model.gguf'}")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: MODEL_PATHS: set, and the models file {path} names the models "
                                          "too: keep one (unset MODEL_PATHS, or unset MODELS_FILE)"]
    checked = run_serve("--check", MODELS_FILE=path, LLAMA_SERVER_URL="http://h:1")
    assert checked.returncode == 1 and checked.stderr.startswith("error: LLAMA_SERVER_URL: set, and the models file")


@posix_only
@pytest.mark.llama
def test_a_models_file_start_serves_by_alias_and_reloads_on_post_on_a_change_and_on_sighup(demo_model_path, tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(f'[models.chat]\nsource = "{demo_model_path}"\naliases = ["gpt-4o-mini"]\nctx = 512\n')
    serve = ServeProcess(MODELS_FILE=str(path), LLAMA_THREADS="1", ADMIN_API_KEY="sk-admin")
    admin = {"Authorization": "Bearer sk-admin"}

    def chat(model):
        return requests.post(serve.url + "/v1/chat/completions", timeout=30, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    try:
        ready = serve.wait_for_event("ready")
        assert ready["models"][0]["name"] == "chat" and ready["models"][0]["aliases"] == ["gpt-4o-mini"]
        assert ready["models_file"] == str(path)
        answer = chat("gpt-4o-mini")
        assert answer.status_code == 200 and answer.json()["model"] == "gpt-4o-mini"
        assert chat("llama").status_code == 404  # a models file routes by name, even one model
        path.write_text(path.read_text().replace('"gpt-4o-mini"', '"gpt-4o-mini", "second"'))
        reloaded = requests.post(serve.url + "/models/reload", headers=admin, timeout=30)
        assert reloaded.json() == {"added": [], "removed": [], "changed": [], "updated": ["chat"]}
        assert serve.wait_for_event("models reloaded")["trigger"] == "admin"  # and the watcher leaves it at that
        assert chat("second").status_code == 200
        path.write_text(path.read_text().replace(', "second"', ""))  # the watcher sees it
        assert serve.wait_for_event("models reloaded", timeout=20)["trigger"] == "file changed"
        assert chat("second").status_code == 404
        serve.process.send_signal(signal.SIGHUP)
        assert serve.wait_for_event("models reloaded", timeout=20)["trigger"] == "SIGHUP"
        assert chat("gpt-4o-mini").status_code == 200  # SIGHUP reloads; it does not end the gateway
    finally:
        assert serve.stop() == 0
