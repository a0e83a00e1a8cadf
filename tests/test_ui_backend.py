"""The operators' page's data about models and requests: the requests in flight and their Cancel (llama.cpp's own
/slots says the slot is free; the client is told), llama.cpp's own log lines per model (never in the gateway's log),
a llama.cpp that died and came back (its restarts and last exit), each model's life in the pool (fake llama.cpps
where the pool's states are the point), names from files that would pass for others, and the limits' window."""
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
from service.ui.recent import RecentRequests
from tests.fakes import SSE_HEAD, BrokenPeer, Clock, FakeSupervisor, chunk
from tests.processes import LONG

ADMIN_KEY = "sk-admin-backend"
KEYS = {"ADMIN_API_KEY": ADMIN_KEY, "OPENAI_API_KEYS": "sk-team-backend:team,sk-other-backend:other"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CANCELLED = {"message": "An operator cancelled this request on the gateway's page", "type": "server_error",
             "param": None, "code": "cancelled_by_admin"}


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
        cancel = f"{base}/ui/api/requests/{running['handle']}/cancel"
        cancelled = requests.post(cancel, headers=ADMIN, timeout=5)
        assert cancelled.status_code == 200 and cancelled.json() == {"cancelled": True}
        # llama.cpp's own word: the slot is idle again (it notices a closed connection within about a second).
        until(lambda: not any(slot["is_processing"] for slot in slots(slow_llama)), timeout=10,
              what="llama.cpp's slot going idle")
        rest = read_to_end(response)
        assert b"data: [DONE]" not in rest  # cut short: the stream ended without finishing, and says why
        assert last_event(rest) == {"error": CANCELLED}
    finally:
        response.close()
        conn.close()
    assert requests.get(base + "/ui/api/inflight", headers=ADMIN, timeout=5).json() == {"data": []}
    again = requests.post(cancel, headers=ADMIN, timeout=5)
    assert again.status_code == 404


def last_event(stream: bytes):
    """The JSON of a stream's last data event."""
    return json.loads(stream.strip().split(b"\n\n")[-1].removeprefix(b"data: "))


# -- Cancel on fake llama.cpps: by the gateway's handle, and what the client is told -------------------------

CHAT = "/v1/chat/completions"
EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
ASK = {"messages": [{"role": "user", "content": "x"}]}
FIFO = {**KEYS, "SCHEDULER": "fifo"}  # no slot count asked of the fake (it answers nothing)


def then_silent(first=b""):
    """A llama-server's script: send first (an answer's head and events), then nothing until the gateway closes
    the connection (a long generation, a long prompt)."""
    def script(peer, conn):
        conn.sendall(first)
        conn.settimeout(10)
        try:
            conn.recv(1)
        finally:
            peer.closed_by_client.set()
    return script


def post(base, key, request_id, body):
    """(connection, response) of a POST to the chat route with that key and x-request-id; the body unread."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("POST", CHAT, body=json.dumps(body), headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}", "x-request-id": request_id})
    return conn, conn.getresponse()


def in_flight(base, count):
    """/ui/api/inflight's data once it lists count requests."""
    def listed():
        data = requests.get(base + "/ui/api/inflight", headers=ADMIN, timeout=5).json()["data"]
        return data if len(data) == count else None
    return until(listed, what=f"{count} requests in flight")


def test_cancel_cuts_the_one_call_its_handle_names_and_its_stream_ends_saying_so(make_app, live_gateway,
                                                                                  access_log):
    # Two clients stream with the same x-request-id (the client's choice): the page cancels one of them.
    peer, streams = BrokenPeer(then_silent(SSE_HEAD + chunk(EVENT))), []
    try:
        base = live_gateway(make_app(peer.url, **FIFO))
        streams += [post(base, key, "shared-1", {**ASK, "stream": True})
                   for key in ("sk-team-backend", "sk-other-backend")]
        for _, response in streams:
            assert response.read1(65536).startswith(EVENT)
        listed = {request["client_id"]: request for request in in_flight(base, 2)}
        assert {request["request_id"] for request in listed.values()} == {"shared-1"}
        handles = {request["handle"] for request in listed.values()}
        assert len(handles) == 2 and all(len(handle) >= 8 for handle in handles)
        cancelled = requests.post(f"{base}/ui/api/requests/{listed['team']['handle']}/cancel", headers=ADMIN,
                                  timeout=5)
        assert cancelled.status_code == 200 and cancelled.json() == {"cancelled": True}
        rest = read_to_end(streams[0][1])
        assert last_event(rest) == {"error": CANCELLED} and b"[DONE]" not in rest
        assert access_log.line("shared-1")["client_id"] == "team"
        assert access_log.line("shared-1")["error"] == "cancelled_by_admin"
        [other] = in_flight(base, 1)  # the other client's stream goes on
        assert (other["client_id"], other["handle"]) == ("other", listed["other"]["handle"])
    finally:
        for conn, response in streams:
            response.close()
            conn.close()
        peer.close()


def test_a_whole_answer_cancelled_on_the_page_answers_503_cancelled_by_admin(make_app, live_gateway, access_log):
    import threading

    peer = BrokenPeer(then_silent())  # reads the request, never answers
    answers = []
    try:
        base = live_gateway(make_app(peer.url, **FIFO))
        waiting = threading.Thread(target=lambda: answers.append(
            requests.post(base + CHAT, json=ASK, timeout=10,
                          headers={"Authorization": "Bearer sk-team-backend", "x-request-id": "whole-1"})))
        waiting.start()
        [running] = in_flight(base, 1)
        assert running["stream"] is False
        requests.post(f"{base}/ui/api/requests/{running['handle']}/cancel", headers=ADMIN, timeout=5)
        waiting.join(10)
        assert peer.closed_by_client.wait(5)  # llama.cpp sees its connection close
    finally:
        peer.close()
    [answer] = answers
    assert answer.status_code == 503 and answer.json() == {"error": CANCELLED}
    assert answer.headers["x-should-retry"] == "false"  # the SDKs would send it again otherwise
    assert access_log.line("whole-1")["error"] == "cancelled_by_admin"
    assert peer.requests == 1


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


def test_the_limits_window_leaves_out_every_refusal_that_never_reached_the_limiter():
    clock = Clock()
    recent = RecentRequests(clock=clock)
    refusals = [(429, "rate_limit_exceeded"), (429, "budget_exceeded"),  # a stored key's budget: before the limiter
                (403, "admin_key_required"),  # a client key on an admin route
                (429, "rate_limit_error")]  # llama.cpp's own 429, passed on: the limiter counted that one
    for status, code in refusals:
        recent.add({"client_id": "team", "time": clock.now, "status": status, "error": code, "route": CHAT})
    counts = recent.by_client(60)["team"]
    assert (counts["requests"], counts["failures"], counts["window_requests"]) == (4, 4, 1)
