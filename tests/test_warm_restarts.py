"""Warm conversations through the gateway across what ends a llama.cpp or the gateway (issue 22), with real
llama.cpp: a gateway restart keeps the saved conversations, a state of another model file or context size is never
restored, the disk budget deletes the oldest, a kill -9 after a periodic save loses nothing, and an Anthropic
conversation comes back after a swap. Each test runs gateways of its own over demo-model copies."""
import os
import shutil
import signal

import pytest

from service.models.demo_model import write_demo_model
from tests.pools import wait_until
from tests.warm_helpers import (Gateway, answer_of, cached_tokens, conversation, late_load_listeners, model_copies,
                                next_turn)

pytestmark = pytest.mark.llama
HIT = {"model": "a", "result": "hit"}


@pytest.fixture(scope="module")
def saved(demo_model_path, tmp_path_factory):
    """A conversation's first turn on "a", saved as its gateway stopped: (model paths, its KV_CACHE_DIR, the
    conversation's next turn, the first turn's prompt tokens)."""
    folder = tmp_path_factory.mktemp("saved")
    paths, kv = model_copies(demo_model_path, str(folder / "models")), str(folder / "kv")
    gateway = Gateway(paths, kv)
    try:
        messages = conversation("river")
        with late_load_listeners(gateway.fleet.pool):
            first = gateway.chat("a", messages)
    finally:
        gateway.stop()  # saves the slots of the models still loaded
    assert os.path.isfile(os.path.join(kv, gateway.supervisor("a").kv_identity, "index.json"))
    return paths, kv, next_turn(messages, answer_of(first)), first.get_json()["usage"]["prompt_tokens"]


# Another gateway over the saved conversation's folder: what it changes, and whether the state is restored.
RESTARTS = {"the same models and flags": ({}, True), "another context size": ({"LLAMA_CTX": "3072"}, False)}


@pytest.mark.parametrize("change", list(RESTARTS))
def test_a_new_gateway_restores_a_saved_conversation_only_under_the_same_identity(saved, tmp_path, change):
    paths, kv, later, prompt = saved
    settings, restored = RESTARTS[change]
    own_kv = shutil.copytree(kv, tmp_path / "kv")  # each variant its own copy: a restore changes the folder
    gateway = Gateway(paths, own_kv, **settings)
    try:
        with late_load_listeners(gateway.fleet.pool):
            answer = gateway.chat("a", later)
        assert (cached_tokens(answer) >= prompt) is restored
        assert gateway.metric("gateway_kv_restores_total", **HIT) == (1 if restored else 0)
    finally:
        gateway.stop()


@pytest.mark.parametrize("running", [False, True], ids=["across-a-restart", "while-running"])
def test_a_state_of_another_model_file_under_the_same_name_is_never_restored(demo_model_path, tmp_path, running):
    paths = model_copies(demo_model_path, str(tmp_path / "models"))
    gateway = Gateway(paths, tmp_path / "kv")
    try:
        messages = conversation("orchard")
        with late_load_listeners(gateway.fleet.pool):
            first = gateway.chat("a", messages)
            gateway.swap_to("b")  # a's state saved
            write_demo_model(paths["a"], seed=7)  # another model, same name and path: only its mtime tells
            if not running:
                gateway.stop()
                gateway = Gateway(paths, tmp_path / "kv")
            answer = gateway.chat("a", next_turn(messages, answer_of(first)))
        assert cached_tokens(answer) == 0
        assert gateway.metric("gateway_kv_restores_total", **HIT) == 0
    finally:
        gateway.stop()


def test_the_disk_budget_deletes_the_least_recently_used_state(demo_model_path, tmp_path):
    # A state of ~1,200 tokens takes ~0.65 MiB: one fits in 1 MiB, two do not.
    gateway = Gateway(model_copies(demo_model_path, str(tmp_path / "models")), tmp_path / "kv",
                      KV_CACHE_DISK_MIB="1")
    try:
        older, newer = conversation("river"), conversation("lantern")
        with late_load_listeners(gateway.fleet.pool):
            gateway.chat("a", older)
            gateway.chat("a", newer)  # in the other slot: both held, both saved at the unload, the older first
            gateway.swap_to("b")
        assert not os.path.exists(gateway.state_path("a", older))
        assert os.path.isfile(gateway.state_path("a", newer))
        assert gateway.metric("gateway_kv_states", model="a") == 1
    finally:
        gateway.stop()


@pytest.mark.skipif(os.name != "posix", reason="kills llama.cpp with SIGKILL, which Windows does not have")
def test_a_conversation_saved_periodically_survives_a_kill_of_its_llama_cpp(demo_model_path, tmp_path):
    gateway = Gateway(model_copies(demo_model_path, str(tmp_path / "models")), tmp_path / "kv",
                      KV_SAVE_INTERVAL_S="1")
    try:
        messages = conversation("meadow")
        with late_load_listeners(gateway.fleet.pool):
            first = gateway.chat("a", messages)
            # Saved in the background while a stays loaded (bounded wait: the saver ticks every second).
            wait_until(lambda: gateway.metric("gateway_kv_states", model="a") >= 1, timeout=20)
            supervisor = gateway.supervisor("a")
            os.kill(supervisor.process.pid, signal.SIGKILL)
            wait_until(lambda: supervisor.restarts >= 1 and gateway.fleet.pool.statuses()["a"] == "loaded",
                       timeout=30)
            answer = gateway.chat("a", next_turn(messages, answer_of(first)))
        assert cached_tokens(answer) >= first.get_json()["usage"]["prompt_tokens"]
        assert gateway.metric("gateway_kv_restores_total", **HIT) == 1
    finally:
        gateway.stop()


def test_an_anthropic_conversation_is_restored_after_a_swap(demo_model_path, tmp_path):
    # llama.cpp ignores id_slot on /v1/messages and picks the slot itself (1 on a fresh llama.cpp, where the queue
    # gave 0): the gateway asks /slots where the turn ran, so that the slot saved is the one holding it.
    gateway = Gateway(model_copies(demo_model_path, str(tmp_path / "models")), tmp_path / "kv")
    try:
        messages = conversation("orchard")
        body = {"model": "a", "max_tokens": 4, "system": messages[0]["content"], "messages": messages[1:]}
        with late_load_listeners(gateway.fleet.pool):
            first = gateway.post("/v1/messages", body).get_json()
            gateway.swap_to("b")
            answer = "".join(block.get("text", "") for block in first["content"]) or "ok"
            body["messages"] += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
            usage = gateway.post("/v1/messages", body).get_json()["usage"]
        assert usage["cache_read_input_tokens"] >= first["usage"]["input_tokens"]
    finally:
        gateway.stop()
