"""A request that llama.cpp had taken when it crashed is never sent again (issue 25): it may be what killed it.
bin/serve with a real llama.cpp child, SIGKILLed in the middle of a non-streamed generation."""
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import requests

from tests.processes import ServeProcess, llama_metric, posix_only, wait_processing

pytestmark = [pytest.mark.llama, posix_only]

# Long enough (seconds on the slow model) for the kill to land in the middle of it; ignore_eos: only
# max_tokens ends it.
GENERATION = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}


def _embedded_llama(ready) -> SimpleNamespace:
    """The url and pid of the one llama.cpp child the gateway's ready line names."""
    replica, = [replica for model in ready["models"] for replica in model["replicas"] if "pid" in replica]
    return SimpleNamespace(url=replica["url"], pid=replica["pid"])


def _wait_healthy(url, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(0.1)
    pytest.fail(f"the restarted llama.cpp at {url} never became healthy")


def test_a_request_llama_cpp_took_before_it_was_killed_is_not_sent_to_its_restart(slow_model_path):
    gateway = ServeProcess(LLAMA_MODEL=slow_model_path, LOG_FORMAT="json", LLAMA_CTX="1024", LLAMA_PARALLEL="1",
                           LLAMA_THREADS="1", LLAMA_EMBEDDINGS="0", LLAMA_STARTUP_TIMEOUT_S="60",
                           SHUTDOWN_GRACE_S="1")
    try:
        llama = _embedded_llama(gateway.wait_for_event("ready"))
        answers = []
        client = threading.Thread(target=lambda: answers.append(
            requests.post(gateway.url + "/v1/completions", json=GENERATION, timeout=120)))
        client.start()
        wait_processing(llama, 1, timeout=30)  # llama.cpp has the request and is generating
        assert llama_metric(llama, "llamacpp:tokens_predicted_total") == 0  # none finished before it
        os.kill(llama.pid, signal.SIGKILL)
        client.join(120)
        answer, = answers
        # Not sent again once llama.cpp is back: the client hears that it failed, in its API's envelope.
        assert answer.status_code in (502, 503), answer.text
        assert answer.json()["error"]["code"] == "upstream_unavailable"
        _wait_healthy(llama.url)  # the supervisor restarts it (on the same port)
        # The restarted llama.cpp never saw it (a resend would have come before the answer): nothing processed,
        # nothing generated.
        assert llama_metric(llama, "llamacpp:requests_processing") == 0
        assert llama_metric(llama, "llamacpp:prompt_tokens_total") == 0
        assert llama_metric(llama, "llamacpp:tokens_predicted_total") == 0
    finally:
        gateway.stop()
