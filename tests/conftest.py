"""Shared fixtures: real llama.cpp servers on generated demo models, apps, live waitress servers, fake upstreams,
a real Redis, the gateway's request log lines."""
import contextlib
import logging
import socket
import threading
import time

import pytest

from service import create_app
from service.llama.supervisor import LlamaSupervisor
from service.models.demo_model import write_demo_model
from service.wsgi_server import make_server, stop_server
from tests.apps import FAST_SETTINGS
from tests.databases import database_url, open_stores, postgres_server, postgres_url
from tests.processes import start_llama


# Fixtures of other modules, shared with every test from here.
SHARED_FIXTURES = (database_url, open_stores, postgres_server, postgres_url)


@pytest.fixture(scope="session")
def demo_model_path(tmp_path_factory):
    """The demo GGUF, written once per test session."""
    return write_demo_model(str(tmp_path_factory.mktemp("models") / "demo.gguf"))


@pytest.fixture(scope="session")
def llama(demo_model_path):
    """A real llama.cpp server (xllamacpp in a supervised child process) serving the demo model."""
    supervisor = LlamaSupervisor(demo_model_path, ctx=2048, parallel=2, threads=1, embeddings=True,
                                 startup_timeout=60).start()
    yield supervisor
    supervisor.stop()


@pytest.fixture(scope="module")
def other_model_path(tmp_path_factory):
    """A second tiny model, different from the demo model (another seed, another width)."""
    return write_demo_model(str(tmp_path_factory.mktemp("other") / "other.gguf"), seed=1, embedding_size=32)


@pytest.fixture(scope="module")
def other_llama(other_model_path):
    """A second real llama.cpp, serving the second model."""
    supervisor = start_llama(other_model_path)
    yield supervisor
    supervisor.stop()


@pytest.fixture
def make_app():
    """Build an app from settings (strings, as in the environment) on top of FAST_SETTINGS."""
    apps = []

    def build(upstream_url, **settings):
        app = create_app({**FAST_SETTINGS, "LLAMA_SERVER_URL": upstream_url, "TESTING": True, **settings})
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["upstream"].close()
        if app.extensions.get("store") is not None:  # DATABASE_URL given: its thread, its usage written
            app.extensions["store"].close()


@pytest.fixture
def llama_app(make_app, llama):
    """The gateway in front of the real llama.cpp."""
    return make_app(llama.url)


@pytest.fixture
def llama_client(llama_app):
    """A Flask test client of the gateway in front of the real llama.cpp."""
    return llama_app.test_client()


@pytest.fixture
def fake_app(make_app, httpserver):
    """The gateway in front of pytest-httpserver, for exact upstream behaviour."""
    return make_app(httpserver.url_for("").rstrip("/"))


@pytest.fixture
def fake_client(fake_app):
    """A Flask test client of the gateway in front of the fake upstream."""
    return fake_app.test_client()


@pytest.fixture(scope="session")
def _upstream_pool():
    """pytest-httpserver upstreams kept for the whole session (each stop waits out a 0.5 s poll)."""
    servers = []
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def fake_upstreams(_upstream_pool):
    """start(n): n more pytest-httpserver upstreams (for replicas and several models), cleared after the test."""
    from pytest_httpserver import HTTPServer

    def start(n):
        while len(_upstream_pool) < n:
            _upstream_pool.append(HTTPServer(host="127.0.0.1", port=0))
            _upstream_pool[-1].start()
        return _upstream_pool[:n]

    yield start
    for server in _upstream_pool:
        server.clear()


class RedisServer:
    """A real redis-server on a free loopback port, with nothing saved to disk; stop() and start() keep the port."""

    def __init__(self, binary, port):
        self.binary, self.port, self.process = binary, port, None
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self):
        import subprocess

        import redis

        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                assert time.monotonic() < deadline and self.process.poll() is None, "redis-server did not start"
                time.sleep(0.02)

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def redis_server():
    """A real redis-server (Debian's redis-server; .ci/run installs it). Outside CI, a machine without it skips
    these tests, saying so; with GATEWAY_REQUIRE_REDIS=1 (as .ci/run sets) its absence is a failure."""
    import os
    import shutil

    from service.llama.supervisor import free_port

    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("GATEWAY_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed, and GATEWAY_REQUIRE_REDIS=1 says these tests must run")
        pytest.skip("redis-server is not installed (apt-get install redis-server): shared-limit tests not run")
    server = RedisServer(binary, free_port()).start()
    yield server
    if server.process.poll() is None:
        server.stop()



def thread_stacks() -> str:
    """Every thread's stack, for a failure message."""
    import sys
    import traceback

    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "\n".join(f"--- {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame))
                     for ident, frame in sys._current_frames().items())


@contextlib.contextmanager
def serving(app, threads=4):
    """Serve app with waitress on a free loopback port in a thread; yield its base URL."""
    server = make_server(app, host="127.0.0.1", port=0, threads=threads, max_body_bytes=app.config["MAX_BODY_BYTES"])
    thread = threading.Thread(target=server.run, name="waitress-under-test", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
        # Whatever the test did to it, every waitress thread must come back to idle.
        deadline = time.monotonic() + 5
        while server.task_dispatcher.active_count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.task_dispatcher.active_count == 0, "a waitress thread is still busy:\n" + thread_stacks()
    finally:
        stop_server(server)
        thread.join(5)
        assert not thread.is_alive(), "waitress did not stop"


@pytest.fixture
def live_gateway():
    """Start waitress servers for apps (the real server stack); all stop at the end of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda app, threads=4: stack.enter_context(serving(app, threads))


class AccessLog(logging.Handler):
    """Collects the fields of the gateway's request log lines from whichever thread writes them, so that a test
    can wait for one."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []
        self.by_id = {}
        self.written = threading.Condition()

    def emit(self, record):
        if record.getMessage() == "request":
            with self.written:
                self.lines.append(record.fields)
                self.by_id[record.fields.get("request_id")] = record.fields
                self.written.notify_all()

    def line(self, request_id, timeout=10) -> dict:
        """The log line of request_id, once written (when waitress closes the response, after its last byte)."""
        with self.written:
            assert self.written.wait_for(lambda: request_id in self.by_id, timeout), f"no log line for {request_id}"
            return self.by_id[request_id]

    def wait(self, count: int) -> list:
        """The first count lines, once written (the gateway writes one when a response body is closed)."""
        with self.written:
            assert self.written.wait_for(lambda: len(self.lines) >= count, 10), f"log lines: {self.lines}"
            return self.lines[:count]


@pytest.fixture
def access_log():
    """The request lines the gateway writes during the test."""
    logger = logging.getLogger("service.access")
    handler, level = AccessLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def no_anthropic_environment(monkeypatch):
    """The anthropic SDK reads its key and base URL from the environment: the tests say each one themselves."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def slow_model_path(tmp_path_factory):
    """A bigger random model, written once: a generation there lasts long enough for a test to act meanwhile."""
    from service.models.demo_model import write_demo_model

    return write_demo_model(str(tmp_path_factory.mktemp("slow") / "slow.gguf"), embedding_size=512, layers=8,
                            feed_forward_size=2048)


@pytest.fixture(scope="module")
def slow_llama(slow_model_path):
    """A real llama.cpp on the slow model, one slot: 4000 tokens take 20-70 s on a 2-core box."""
    from service.llama.supervisor import LlamaSupervisor

    supervisor = LlamaSupervisor(slow_model_path, ctx=8192, parallel=1, threads=1, embeddings=False,
                                 startup_timeout=60).start()
    yield supervisor
    supervisor.stop()


@pytest.fixture
def no_internet(monkeypatch):
    """Any name but the local host fails to resolve, and the test fails if one was asked for (huggingface_hub
    swallows some failures, such as its telemetry's): nothing in these tests reaches the internet."""
    resolve_name, asked = socket.getaddrinfo, []

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            asked.append(host)
            raise socket.gaierror(f"test: no internet (asked for {host})")
        return resolve_name(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    yield
    assert asked == [], "a test tried to reach the internet"


@pytest.fixture
def models_dir(tmp_path):
    """An empty MODELS_DIR."""
    return str(tmp_path / "models")
