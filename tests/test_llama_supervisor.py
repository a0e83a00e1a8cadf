"""The embedded llama.cpp: the demo model, model choice, and a supervised child that restarts and stops."""
import os
import signal

import pytest

from service.llama.demo_model import DEMO_MODEL_NAME, write_demo_model
from service.llama.model_file import choose_model
from service.llama.supervisor import LlamaStartError, LlamaSupervisor, find_binary


def test_demo_model_is_deterministic(tmp_path):
    first = write_demo_model(str(tmp_path / "a.gguf"))
    second = write_demo_model(str(tmp_path / "b.gguf"))
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()
    assert not list(tmp_path.glob("*.partial"))


def test_choose_model_prefers_setting_then_models_dir_then_demo(tmp_path):
    configured = str(tmp_path / "x.gguf")
    assert choose_model(configured, str(tmp_path)).source == "LLAMA_MODEL"
    demo = choose_model(None, str(tmp_path / "empty"))
    assert demo.source == "demo" and demo.is_demo and os.path.basename(demo.path) == DEMO_MODEL_NAME
    (tmp_path / "empty" / "real.gguf").write_bytes(b"GGUF")
    found = choose_model(None, str(tmp_path / "empty"))
    assert (found.source, os.path.basename(found.path), found.is_demo) == ("models/", "real.gguf", False)


def test_llama_http_threads_cover_the_gateway_pool():
    from service.config import load_settings

    supervisor = LlamaSupervisor.from_settings(load_settings({"WAITRESS_THREADS": "10"}), "/m.gguf")
    command = supervisor.command()
    assert command[command.index("--threads-http") + 1] == "14"
    assert command[command.index("--alias") + 1] == "m"


def test_missing_binary_is_a_clear_error():
    with pytest.raises(LlamaStartError, match="LLAMA_SERVER_BIN"):
        find_binary("/no/such/llama-server")


def test_child_that_cannot_load_fails_with_its_last_lines(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    with pytest.raises(LlamaStartError, match="exited with code"):
        LlamaSupervisor(str(broken), startup_timeout=30).start()


@pytest.mark.llama
def test_killed_child_is_restarted_health_shows_the_gap_and_requests_recover(demo_model_path, make_app):
    supervisor = LlamaSupervisor(demo_model_path, ctx=512, parallel=1, threads=1, embeddings=False,
                                 startup_timeout=30).start()
    client = make_app(supervisor.url, HEALTH_CACHE_S="0").test_client()
    try:
        assert client.get("/health").status_code == 200
        first = supervisor.process
        os.kill(first.pid, signal.SIGKILL)
        first.wait(5)
        statuses = []
        for _ in range(200):  # the watcher restarts it on the same port after its 1 s backoff
            statuses.append(client.get("/health").status_code)
            if statuses[-1] == 200 and supervisor.process is not first:
                break
            supervisor._stopping.wait(0.05)
        assert 503 in statuses, "/health never showed the gap"
        assert statuses[-1] == 200 and supervisor.restarts == 1
        completion = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "ignore_eos": True})
        assert completion.status_code == 200
    finally:
        supervisor.stop()
    assert supervisor.process.poll() is not None
