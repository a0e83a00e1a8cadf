"""The operators' page's data about models and requests: the requests in flight and their Cancel (llama.cpp's own
/slots says the slot is free), llama.cpp's own log lines per model (never in the gateway's log), a llama.cpp that
died and came back (its restarts and last exit), each model's life in the pool (fake llama.cpps where the pool's
states are the point), and names from files that would pass for others."""
import http.client
import json
import logging
import os
import signal
import time
from urllib.parse import urlsplit

import pytest
import requests

from service import create_app
from service.llama.pool import ModelPool
from service.llama.pooled_model import PooledModel
from service.llama.supervisor import LlamaSupervisor
from tests.apps import FAST_SETTINGS
from tests.fakes import FakeSupervisor
from tests.processes import LONG

ADMIN_KEY = "sk-admin-backend"
KEYS = {"ADMIN_API_KEY": ADMIN_KEY, "OPENAI_API_KEYS": "sk-team-backend:team"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def until(check, timeout=15, what="the condition"):
    """check()'s first true value, polled until timeout."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} never came"
        time.sleep(0.05)


@pytest.mark.llama
def test_cancel_from_the_page_ends_the_stream_and_frees_llama_cpps_slot(slow_llama, make_app, live_gateway):
    base = live_gateway(make_app(slow_llama.url, **KEYS))
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({**LONG, "stream": True}),
                 headers={"Content-Type": "application/json", "Authorization": "Bearer sk-team-backend",
                          "x-request-id": "long-story-1"})
    response = conn.getresponse()
    try:
        assert response.read1(65536).startswith(b"data: ")  # generating
        [running] = until(lambda: requests.get(base + "/ui/api/inflight", headers=ADMIN, timeout=5).json()["data"],
                          what="the request in the in-flight list")
        assert (running["request_id"], running["client_id"], running["path"]) == (
            "long-story-1", "team", "/v1/completions")
        assert running["age_s"] >= 0 and running["chunks_sent"] >= 0 and running["stream"] is True
        assert until(lambda: any(slot["is_processing"] for slot in slots(slow_llama)), what="a busy slot")
        cancelled = requests.post(base + "/ui/api/requests/long-story-1/cancel", headers=ADMIN, timeout=5)
        assert cancelled.status_code == 200 and cancelled.json() == {"cancelled": True}
        # llama.cpp's own word: the slot is idle again (it notices a closed connection within about a second).
        until(lambda: not any(slot["is_processing"] for slot in slots(slow_llama)), timeout=10,
              what="llama.cpp's slot going idle")
        rest = read_to_end(response)
        assert b"data: [DONE]" not in rest  # cut short: the stream ended without finishing
    finally:
        response.close()
        conn.close()
    assert requests.get(base + "/ui/api/inflight", headers=ADMIN, timeout=5).json() == {"data": []}
    again = requests.post(base + "/ui/api/requests/long-story-1/cancel", headers=ADMIN, timeout=5)
    assert again.status_code == 404


def slots(llama) -> list:
    return requests.get(llama.url + "/slots", timeout=5).json()


def read_to_end(response) -> bytes:
    data = b""
    while True:
        more = response.read1(65536)
        if not more:
            return data
        data += more


@pytest.fixture
def pooled_llama(demo_model_path):
    """A gateway running the demo model in its pool ("demo", a llama.cpp of its own): (client, supervisor)."""
    supervisor = LlamaSupervisor(demo_model_path, ctx=512, parallel=1, threads=1, embeddings=False,
                                 startup_timeout=60)
    pool = ModelPool([PooledModel("demo", supervisor)], load_timeout_s=60)
    app = create_app({**FAST_SETTINGS, **KEYS, "MODEL_UPSTREAMS": f"demo={supervisor.url}"}, pool=pool)
    pool.start()
    try:
        yield app.test_client(), supervisor
    finally:
        pool.stop()
        app.extensions["upstream"].close()


def demo_state(client) -> dict:
    [model] = client.get("/ui/api/state", headers=ADMIN).get_json()["models"]
    return model


@pytest.mark.llama
@pytest.mark.skipif(os.name != "posix", reason="kills llama.cpp with SIGKILL")
def test_llama_cpps_own_lines_and_its_restart_are_on_the_page_and_never_in_the_log(pooled_llama, caplog):
    client, supervisor = pooled_llama
    caplog.set_level(logging.INFO)
    model = demo_state(client)
    assert (model["status"], model["life"]["restarts"], model["life"]["last_exit"]) == ("loaded", 0, None)
    assert model["life"]["ctx"] == 512 and model["life"]["slots_total"] == 1 and model["life"]["memory_mib"] > 0
    lines = client.get("/ui/api/models/demo/log", headers=ADMIN).get_json()["lines"]
    assert lines[0].startswith("[gateway] llama.cpp started, pid") and len(lines) > 5
    os.kill(supervisor.process.pid, signal.SIGKILL)
    until(lambda: supervisor.restarts == 1 and demo_state(client)["status"] == "loaded", timeout=30,
          what="llama.cpp serving again")
    life = demo_state(client)["life"]
    assert (life["restarts"], life["last_exit"]) == (1, "killed by SIGKILL") and life["last_exit_at"] <= time.time()
    after = client.get("/ui/api/models/demo/log", headers=ADMIN).get_json()
    assert after["model"] == "demo" and "[gateway] llama.cpp killed by SIGKILL; restarting in 1 s" in after["lines"]
    assert after["lines"][:len(lines)] == lines  # the dead one's lines are kept: they may say why it died
    told = " ".join(record.getMessage() + str(getattr(record, "fields", "")) for record in caplog.records
                    if record.levelno >= logging.INFO)
    own = [line for line in lines[1:] if len(line) > 20]
    assert own and not [line for line in own if line in told]  # llama.cpp's words stay on the page


# -- each model's life in the pool, on fake llama.cpps -------------------------------------------------------

@pytest.fixture
def upstream(httpserver):
    """A llama-server that is healthy: where the fake llama.cpps "run"."""
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    return httpserver.url_for("").rstrip("/")


@pytest.fixture
def pooled(upstream):
    """build(**pool options): (client, pool, supervisors) of a gateway running "chat" and "other" (fakes)."""
    apps = []

    def build(chat_options=None, **pool_options):
        supervisors = {"chat": FakeSupervisor(upstream), "other": FakeSupervisor(upstream + "/other")}
        pool = ModelPool([PooledModel("chat", supervisors["chat"], **(chat_options or {})),
                          PooledModel("other", supervisors["other"])], load_timeout_s=5, **pool_options)
        app = create_app({**FAST_SETTINGS, **KEYS, "MODEL_UPSTREAMS": f"chat={upstream},other={upstream}/other"},
                         pool=pool)
        apps.append(app)
        return app.test_client(), pool, supervisors

    yield build
    for app in apps:
        app.extensions["upstream"].close()


def models_of(client) -> dict:
    return {model["name"]: model for model in client.get("/ui/api/state", headers=ADMIN).get_json()["models"]}


def test_a_load_says_beforehand_which_models_it_will_unload(pooled):
    client, pool, _ = pooled(max_loaded=1)
    assert models_of(client)["other"]["life"]["load_unloads"] == []  # room for one: nothing to unload
    assert client.post("/models/load", headers=ADMIN, json={"model": "chat"}).status_code == 200
    models = models_of(client)
    assert models["other"]["life"]["load_unloads"] == ["chat"] and models["chat"]["life"]["load_unloads"] == []
    assert [model["status"] for model in models.values()] == ["loaded", "unloaded"]  # the preview changed nothing
    life = models["chat"]["life"]
    assert life["load_s"] is not None and life["loaded_at"] <= life["last_used"]
    assert (life["restarts"], life["last_exit"], life["pinned"]) == (0, None, False)


def test_a_pinned_model_is_never_named_as_what_a_load_will_unload(pooled):
    client, pool, _ = pooled(chat_options={"pinned": True}, max_loaded=1)
    assert client.post("/models/load", headers=ADMIN, json={"model": "chat"}).status_code == 200
    models = models_of(client)
    assert models["other"]["life"]["load_unloads"] == [] and models["chat"]["life"]["pinned"] is True


def test_an_idle_model_says_when_its_ttl_will_unload_it(pooled):
    client, pool, _ = pooled(chat_options={"ttl_s": 600.0})
    assert client.post("/models/load", headers=ADMIN, json={"model": "chat"}).status_code == 200
    life = models_of(client)["chat"]["life"]
    assert life["idle_unload_at"] == pytest.approx(life["last_used"] + 600, abs=1)
    assert models_of(client)["other"]["life"]["idle_unload_at"] is None


def test_a_model_shows_draining_while_its_requests_finish_and_restarting_while_its_llama_comes_back(pooled):
    import threading

    client, pool, supervisors = pooled()
    route = client.application.extensions["router"].routes["chat"]
    hold = pool.claim(route)
    assert hold.wait(5)
    unloading = threading.Thread(target=pool.unload, args=("chat",))
    unloading.start()
    try:
        with pool._changed:
            assert pool._changed.wait_for(lambda: pool.model_named("chat").state == "draining", 5)
        assert models_of(client)["chat"]["status"] == "draining"
    finally:
        hold.release()
        unloading.join(5)
    assert models_of(client)["chat"]["status"] == "unloaded"
    assert client.post("/models/load", headers=ADMIN, json={"model": "chat"}).status_code == 200
    supervisor = supervisors["chat"]
    supervisor.restarts, supervisor.last_exit, supervisor.last_exit_at = 1, "killed by SIGKILL", 123.0
    supervisor.on_state("restarting", "llama.cpp exited with code -9")
    chat_model = models_of(client)["chat"]
    assert chat_model["status"] == "restarting"
    assert (chat_model["life"]["restarts"], chat_model["life"]["last_exit"]) == (1, "killed by SIGKILL")
    supervisor.on_state("ready", None)
    assert models_of(client)["chat"]["status"] == "loaded"


def test_a_model_file_named_to_pass_for_another_is_named_with_its_tricks_shown(tmp_path, upstream):
    from service.models.demo_model import write_demo_model
    from service.models.model_file import model_files
    from service.models.spec import ModelSet, ModelSpec

    write_demo_model(str(tmp_path / "rtl-\u202egnp.exe.gguf"))
    write_demo_model(str(tmp_path / "line\nbreak.gguf"))
    names = sorted(model.name for model in model_files(str(tmp_path)))
    assert names == ["line\\nbreak", "rtl-\\u202egnp.exe"]
    models = ModelSet(tuple(ModelSpec(id=name, upstreams=(upstream,)) for name in names))
    app = create_app({**FAST_SETTINGS, **KEYS}, models=models)
    try:
        shown = [model["name"] for model in app.test_client().get("/ui/api/state", headers=ADMIN).get_json()["models"]]
    finally:
        app.extensions["upstream"].close()
    assert shown == ["line\\nbreak", "rtl-\\u202egnp.exe"]  # the escapes as text, for any page to show
    assert all(name.isprintable() for name in shown)
