"""Connection floods against the real server: half-open connections from one client neither lock another client
out nor stay open past IDLE_CONNECTION_TIMEOUT_S."""
import contextlib
import os
import socket
import threading
import time

import pytest
import requests
from waitress.channel import HTTPChannel

from service.serve import raise_open_file_limit
from service.wsgi_server import make_server, stop_server

# Past select()'s 1024 descriptors in the server (poll() is used where it exists), and past waitress's old
# connection_limit of 100. Windows has only select(), capped at 512 sockets by CPython: stay under it there.
FLOOD = 1100 if os.name == "posix" else 400


@contextlib.contextmanager
def flood_gateway(app, **limits):
    """Serve app on a free loopback port with the given connection limits; yield the server."""
    server = make_server(app, host="127.0.0.1", port=0, threads=2, max_body_bytes=1024, **limits)
    loop = threading.Thread(target=server.run, name="waitress-flooded", daemon=True)
    loop.start()
    try:
        yield server
    finally:
        stop_server(server)
        loop.join(5)


def half_open(port) -> socket.socket:
    """A connection whose request headers never end."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\n")
    return sock


def channels(server) -> int:
    """How many client connections the server holds."""
    return sum(isinstance(item, HTTPChannel) for item in list(server._map.values()))


@pytest.fixture
def upstream(httpserver):
    """A fake llama-server whose /health answers."""
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    return httpserver.url_for("").rstrip("/")


def test_half_open_connections_do_not_lock_another_client_out(make_app, upstream):
    raise_open_file_limit()  # the client and the server sides of the flood are in this one process
    with flood_gateway(make_app(upstream)) as server, contextlib.ExitStack() as flood:
        socks = [flood.enter_context(half_open(server.effective_port)) for _ in range(FLOOD)]
        # Wait until waitress holds them all (no event tells it), so that /health comes after the whole flood.
        deadline = time.monotonic() + 10
        while channels(server) < len(socks) and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        answer = requests.get(f"http://127.0.0.1:{server.effective_port}/health", timeout=2)
        elapsed = time.monotonic() - started
        assert answer.status_code == 200
        assert elapsed < 2
        assert channels(server) >= FLOOD


def test_a_half_open_connection_is_dropped_after_the_idle_timeout(make_app, upstream):
    with flood_gateway(make_app(upstream), idle_timeout_s=1) as server, \
            half_open(server.effective_port) as sock:
        started = time.monotonic()
        try:
            closed = sock.recv(1024) == b""
        except ConnectionResetError:
            closed = True
        # waitress checks every cleanup_interval (1 s here) on a loop that wakes at least once a second.
        assert closed
        assert 0.9 <= time.monotonic() - started < 4


@pytest.mark.skipif(os.name != "posix", reason="Windows has no open-file limit to raise")
def test_the_soft_open_file_limit_is_raised_to_the_hard_one():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raised = raise_open_file_limit()
        assert raised == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised == hard if hard != resource.RLIM_INFINITY else raised > 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
