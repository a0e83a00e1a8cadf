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
from service.serve import warn_unknown_settings
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
