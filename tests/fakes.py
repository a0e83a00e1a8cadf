"""Fakes: llama-server's answers, an upstream URL nothing listens on, a raw-socket peer for the faults
pytest-httpserver cannot make (resets, hangs mid-stream), a pytest-httpserver handler for streams that wait for the
test, a clock the test moves by hand, and a llama.cpp supervisor that starts at the test's word."""
import socket
import struct
import threading

from werkzeug import Response

# llama-server's 503 while it loads its model: retried by the gateway, reported as "loading".
LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
# The smallest chat completion llama-server answers.
COMPLETION = {"object": "chat.completion", "choices": []}
# A chat completion under the model's file name (what routing renames) and with usage (what the gateway counts).
CHAT_ANSWER = {"object": "chat.completion", "model": "file-name.gguf", "choices": [],
               "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n")


def unused_port_url() -> str:
    """The URL of a loopback port nothing listens on (a llama-server that refuses connections)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class BrokenPeer:
    """Accepts connections on a loopback port; each is handled by script(conn) after the request is read."""

    def __init__(self, script):
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.done = threading.Event()  # set to let a hanging script finish
        self.closed_by_client = threading.Event()
        self.requests = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.requests += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            read_request(conn)
            try:
                self.script(self, conn)
            except OSError:
                self.closed_by_client.set()

    def reset(self, conn):
        """Close conn with a TCP reset instead of an orderly close."""
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def close(self):
        """Stop accepting and release any script that is waiting."""
        self.done.set()
        self.listener.close()


def read_request(conn) -> bytes:
    """Read one HTTP request (head and Content-Length body) from conn."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return data
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        more = conn.recv(65536)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body


def gated_stream(first: bytes, rest: bytes, release: threading.Event, wait_s: float = 10):
    """A pytest-httpserver handler that streams first, waits until release is set, then streams rest."""
    def handle(request):
        def events():
            yield first
            release.wait(wait_s)
            yield rest
        return Response(events(), content_type="text/event-stream")
    return handle


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeSupervisor:
    """A supervisor whose start() waits for the test's go-ahead (when gated) and may be told to fail."""

    def __init__(self, url):
        self.url = url
        self.args = ()  # llama-server flags beyond the gateway's own (LlamaSupervisor's): none, so no projector
        self.starts = self.stops = 0
        self.gate = None  # a threading.Event start() waits for
        self.fail_with = None
        self.on_state = None
        self.running = False

    def start(self):
        self.starts += 1
        if self.gate is not None:
            assert self.gate.wait(5)
        if self.fail_with:
            from service.models.errors import LlamaStartError

            raise LlamaStartError(self.fail_with)
        self.running = True
        return self

    def stop(self):
        self.stops += 1
        self.running = False
