"""The embedded llama.cpp: the demo model, model choice, and a supervised child that restarts and stops."""
import http.server
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from service.llama import supervisor as supervisor_module
from service.llama.supervisor import LlamaSupervisor, find_binary, first_error
from service.models.demo_model import DEMO_MODEL_NAME, write_demo_model
from service.models.errors import LlamaStartError
from service.models.model_file import choose_model


def test_demo_model_is_deterministic(tmp_path):
    first = write_demo_model(str(tmp_path / "a.gguf"))
    second = write_demo_model(str(tmp_path / "b.gguf"))
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()
    assert not list(tmp_path.glob("*.partial"))


def test_choose_model_prefers_setting_then_models_dir_then_demo(tmp_path):
    configured = str(tmp_path / "x.gguf")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
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


def test_child_that_cannot_load_fails_with_llama_cpps_own_error_in_one_line(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    with pytest.raises(LlamaStartError) as failed:
        LlamaSupervisor(str(broken), startup_timeout=30).start()
    # The cause first, not buried in the ~20 lines llama.cpp printed.
    assert re.fullmatch(r"llama\.cpp exited with code 1 while loading broken\.gguf: \w+: invalid magic characters.*",
                        str(failed.value)), str(failed.value)


@pytest.mark.parametrize("lines, said", [
    (["0.00.001 I srv init: loading model", "0.00.002 E gguf_init: invalid  magic", "0.00.003 E srv init: exiting"],
     "gguf_init: invalid magic"),  # llama.cpp's own format: its first error
    (["loading model", "error: couldn't bind HTTP server socket", "exiting"],
     "error: couldn't bind HTTP server socket"),  # plain text, as a llama-server binary logs by default
    (["loading model", "Killed"], "Killed"),
    ([], "it printed nothing")])
def test_the_line_that_says_what_went_wrong(lines, said):
    assert first_error(lines) == said


# Another program: a web server that answers 200 to everything, as a stray llama-server would; prints its port.
ANSWERS_200 = """
import http.server, sys
class Any(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Any)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture
def other_program():
    """The port of another process that answers 200 on it."""
    process = subprocess.Popen([sys.executable, "-c", ANSWERS_200], stdout=subprocess.PIPE, text=True)
    try:
        yield int(process.stdout.readline())
    finally:
        process.kill()
        process.wait(5)


def test_a_port_another_program_holds_is_refused_before_starting(demo_model_path, other_program):
    supervisor = LlamaSupervisor(demo_model_path, port=other_program, ctx=512, parallel=1, threads=1,
                                 embeddings=False, startup_timeout=30)
    try:
        with pytest.raises(LlamaStartError, match=rf"^port {other_program} on 127\.0\.0\.1 is in use by another "
                                                  r"program.*set LLAMA_PORT to a free port"):
            supervisor.start()
        assert supervisor.process is None, "a child was started onto a port it cannot have"
    finally:
        supervisor.stop()


def test_the_windows_port_probe_binds_with_no_option(monkeypatch):
    # SO_EXCLUSIVEADDRUSE fails while connections of the last child linger, as on a restart on the same port.
    options = []
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        monkeypatch.setattr(socket.socket, "setsockopt", lambda self, *option: options.append(option))
        assert supervisor_module.port_in_use("127.0.0.1", port, windows=True)
    assert not supervisor_module.port_in_use("127.0.0.1", port, windows=True)
    assert options == []


@pytest.mark.llama
def test_a_200_from_another_program_is_not_the_child_serving(demo_model_path, other_program, monkeypatch):
    # The port was free when checked; another program took it before the child could listen.
    monkeypatch.setattr(supervisor_module, "port_in_use", lambda host, port: False)
    supervisor = LlamaSupervisor(demo_model_path, port=other_program, ctx=512, parallel=1, threads=1,
                                 embeddings=False, startup_timeout=30)
    try:
        with pytest.raises(LlamaStartError) as failed:
            supervisor.start()
    finally:
        supervisor.stop()
    assert re.match(r"llama\.cpp exited with code 1 while loading demo\.gguf: .*couldn't bind", str(failed.value))


def test_a_child_gone_by_the_time_of_its_200_is_not_ready(monkeypatch):
    # A llama-server binary says nothing the supervisor waits for: a 200 counts only if the child still runs then.
    monkeypatch.setattr(supervisor_module, "port_in_use", lambda host, port: False)
    supervisor = LlamaSupervisor("/fake.gguf", startup_timeout=10)
    supervisor.says_serving = False
    supervisor.command = lambda: [sys.executable, "-c", "import time; time.sleep(60)"]

    class AnswersOnceTheChildIsGone(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            supervisor.process.kill()  # the child could not listen and left; another program answers
            supervisor.process.wait(5)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), AnswersOnceTheChildIsGone)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    supervisor.port = other.server_address[1]
    try:
        with pytest.raises(LlamaStartError, match="exited with code"):
            supervisor.start()
    finally:
        supervisor.stop()
        other.shutdown()
        other.server_close()


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


# A stand-in for service.llama.child: answers /health with 200 once it has "loaded" for argv[1] seconds, and says
# that it serves as the child does. With argv[2] "split", it says so in the middle of a log line, as it happens
# when llama.cpp writes its time and level before the text of a line from its own thread.
FAKE_LLAMA = """
import http.server, os, sys, time
from service.llama.child import say_serving
port = int(sys.argv[sys.argv.index("--port") + 1])
time.sleep(float(sys.argv[1]))
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Health)
if sys.argv[2] == "split":
    os.write(1, b"0.01.234 I ")
say_serving(f"http://127.0.0.1:{port}")
if sys.argv[2] == "split":
    os.write(1, b"srv  update_slots: all slots are idle\\n")
server.serve_forever()
"""


class FakeLlama(LlamaSupervisor):
    """A supervisor of a tiny Python HTTP server instead of llama.cpp; it keeps every child it spawned."""

    def __init__(self):
        super().__init__("/fake.gguf", startup_timeout=10)
        self.load_s = 0.0
        self.split = False  # says that it serves inside a log line
        self.children = queue.Queue()
        self.spawned = []

    def command(self):
        """Run the stand-in, loading for load_s seconds."""
        return [sys.executable, "-c", FAKE_LLAMA, str(self.load_s), "split" if self.split else "whole", *self.flags]

    def _spawn(self):
        started = super()._spawn()
        if self.process is not None and self.process not in self.spawned:
            self.spawned.append(self.process)
            self.children.put(self.process)
        return started


@pytest.fixture
def fake_llama(monkeypatch):
    """Start a FakeLlama with a fast restart backoff; at the end, kill whatever child it left alive."""
    monkeypatch.setattr(supervisor_module, "RESTART_DELAY_S", 0.01)
    supervisors = []

    def start(**attributes):
        supervisors.append(FakeLlama())
        vars(supervisors[-1]).update(attributes)
        return supervisors[-1].start()

    yield start
    for supervisor in supervisors:
        supervisor.stop()
        for child in supervisor.spawned:
            if child.poll() is None:
                child.kill()
                child.wait(5)


def alive(supervisor) -> list:
    """The children of supervisor that still run."""
    return [child.pid for child in supervisor.spawned if child.poll() is None]


def test_a_child_that_says_it_serves_inside_a_log_line_of_llama_cpp_is_ready(fake_llama):
    supervisor = fake_llama(split=True, startup_timeout=5)
    assert requests.get(supervisor.url + "/health", timeout=5).status_code == 200
    # The line did land inside the other (read after readiness: the file may be written before stdout is read).
    deadline = time.monotonic() + 5
    while "srv  update_slots" not in " ".join(supervisor.output) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(line.startswith("0.01.234 I service.llama.child: serving on") for line in supervisor.output)


def test_a_restart_onto_a_port_another_program_took_fails_and_says_so(fake_llama):
    supervisor = fake_llama()
    first = supervisor.children.get_nowait()
    said, taken = queue.Queue(), []

    def on_state(state, detail):
        if state == "restarting" and not taken:  # the child died; another program takes its port meanwhile
            taken.append(socket.create_server(("127.0.0.1", supervisor.port)))
        said.put((state, detail))

    supervisor.on_state = on_state
    first.kill()
    try:
        assert said.get(timeout=10)[0] == "restarting"
        state, detail = said.get(timeout=10)
    finally:
        taken[0].close()
    assert state == "failed", detail
    assert re.match(rf"port {supervisor.port} on 127\.0\.0\.1 is in use by another program.*restart the gateway",
                    detail)
    assert supervisor.spawned == [first], "a child was started onto the taken port"


def test_stop_while_the_watcher_spawns_a_restart_leaves_no_child(fake_llama):
    supervisor = fake_llama()
    first = supervisor.children.get_nowait()
    in_spawn = threading.Event()
    command = supervisor.command

    def slow_command():
        # Runs inside _spawn, before the child exists: hold the watcher there until stop() has begun.
        in_spawn.set()
        supervisor._stopping.wait(10)
        return command()

    supervisor.command = slow_command
    first.kill()
    assert in_spawn.wait(10), "the watcher never began a restart"
    supervisor.stop()
    supervisor._watcher.join(10)
    assert len(supervisor.spawned) == 2, "the restart under way was dropped instead of ended"
    assert alive(supervisor) == [], "a child spawned while stop() ran outlived it"


def test_stop_while_a_restart_loads_ends_it_quietly(fake_llama, caplog):
    caplog.set_level(logging.INFO, logger=supervisor_module.__name__)
    supervisor = fake_llama()
    first = supervisor.children.get_nowait()
    supervisor.load_s = 30  # the restarted child takes long to load: the watcher waits in wait_ready
    first.kill()
    second = supervisor.children.get(timeout=10)
    supervisor.stop()
    assert not supervisor._watcher.is_alive(), "stop() returned with the watcher still running"
    assert second.poll() is not None and alive(supervisor) == []
    events = [record.getMessage() for record in caplog.records]
    assert "llama.cpp restart failed" not in events and "llama.cpp serving again" not in events


def test_stop_returns_once_the_watcher_has_finished(fake_llama):
    supervisor = fake_llama()
    first = supervisor.children.get_nowait()
    supervisor.load_s = 30
    wait_ready = supervisor.wait_ready

    def wait_ready_slow_to_notice(timeout=None):
        supervisor._stopping.wait(10)  # stop() has begun ...
        time.sleep(0.5)  # ... while a health probe of the restarted child is still under way
        wait_ready(timeout)

    supervisor.wait_ready = wait_ready_slow_to_notice
    first.kill()
    supervisor.children.get(timeout=10)
    watcher = supervisor._watcher
    supervisor.stop()
    # Else a start() now would find the old watcher still running, and a restart could still follow.
    assert not watcher.is_alive(), "stop() returned with the watcher still running"
    assert alive(supervisor) == []


def test_a_spawn_that_comes_after_stop_starts_nothing(fake_llama):
    supervisor = fake_llama()
    supervisor.stop()
    stopped = supervisor.process
    # The watcher's respawn, had it lost the race for the lock to stop(): it must start no child.
    assert supervisor._spawn() is False
    assert supervisor.process is stopped and alive(supervisor) == []


def test_start_while_running_is_refused(fake_llama):
    supervisor = fake_llama()
    with pytest.raises(RuntimeError, match="already started"):
        supervisor.start()
    supervisor.stop()


@pytest.mark.llama
def test_stopped_supervisor_starts_again_with_a_fresh_watcher(demo_model_path, monkeypatch):
    monkeypatch.setattr(supervisor_module, "RESTART_DELAY_S", 0.05)
    supervisor = LlamaSupervisor(demo_model_path, ctx=512, parallel=1, threads=1, embeddings=False,
                                 startup_timeout=30).start()
    try:
        first, first_watcher = supervisor.process, supervisor._watcher
        supervisor.stop()
        assert first.poll() is not None and not first_watcher.is_alive()
        supervisor.start()
        second = supervisor.process
        assert second is not first and second.poll() is None
        assert requests.get(supervisor.url + "/health", timeout=5).status_code == 200
        assert supervisor._watcher is not first_watcher and supervisor._watcher.is_alive()
        assert supervisor.restarts == 0, "a start after stop() is not a restart"
        # The fresh watcher does its work: a crash is restarted, and counted once.
        ready = threading.Event()
        wait_ready = supervisor.wait_ready

        def wait_ready_and_tell(timeout=None):
            wait_ready(timeout)
            ready.set()

        supervisor.wait_ready = wait_ready_and_tell
        second.kill()
        assert ready.wait(30), "the child was not restarted"
        assert supervisor.restarts == 1 and supervisor.process not in (first, second)
        assert requests.get(supervisor.url + "/health", timeout=5).status_code == 200
    finally:
        supervisor.stop()
    assert supervisor.process.poll() is not None and not supervisor._watcher.is_alive()
