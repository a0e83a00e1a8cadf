"""The waitress server the gateway runs in: its settings, its own errors in the client's envelope, a clean stop."""
import logging
import threading
import time
import uuid

import waitress
from waitress.channel import HTTPChannel
from waitress import wasyncore
from waitress.parser import HTTPRequestParser, ParsingError, TransferEncodingNotImplemented
from waitress.task import ErrorTask

from . import wsgi_loop
from .families import family_for

log = logging.getLogger(__name__)


class EnvelopeErrorTask(ErrorTask):
    """waitress's own answers (a body over the limit, refused before it is read; malformed HTTP) as JSON envelopes."""

    def execute(self):
        """Write the error in the envelope of the client's API family, then close the connection as waitress
        does."""
        error = self.request.error
        if error.code == 413:
            message = (f"Request body is too large; the limit is {self.channel.adj.max_request_body_size} bytes "
                       "(MAX_BODY_BYTES)")
        else:
            message = f"{error.reason}: {error.body}"
        # Flask never sees this request: its family comes from its path and headers, as the app would find it.
        app_extensions = getattr(self.channel.server.application, "extensions", {})
        family = family_for(app_extensions.get("families_by_path", {}), self.request.path,
                            "ANTHROPIC_VERSION" in self.request.headers)
        body = family.error_json(error.code, message).encode()
        status = family.status(error.code)
        self.status = f"{status} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        request_id = uuid.uuid4().hex
        self.response_headers.extend((name, request_id) for name in family.request_id_headers)
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Headers(dict):
    """The parser's header mapping, keeping the Transfer-Encoding that waitress pops before anyone can see it."""

    transfer_encoding = None

    def pop(self, key, *default):
        """Remove key as dict does; remember the Transfer-Encoding's value."""
        value = super().pop(key, *default)
        if key == "TRANSFER_ENCODING" and value:
            self.transfer_encoding = value
        return value


class StrictFramingParser(HTTPRequestParser):
    """waitress's request parser, refusing a request whose body framing a proxy in front could read otherwise
    (RFC 9112 section 6.3): both Content-Length and Transfer-Encoding, or a Transfer-Encoding other than one
    `chunked`. The 400 goes through EnvelopeErrorTask, which closes the connection after it."""

    def __init__(self, adj):
        super().__init__(adj)
        self.headers = _Headers()

    def parse_header(self, header_plus):
        """Parse as waitress does, then refuse ambiguous framing as a ParsingError (waitress's 400)."""
        try:
            super().parse_header(header_plus)
        except TransferEncodingNotImplemented:
            # waitress answers 501 and closes; a coding it cannot decode is a framing it cannot trust: 400.
            raise ParsingError("Transfer-Encoding other than chunked is not accepted") from None
        # HTTP/1.1: waitress popped it into _Headers; HTTP/1.0: waitress ignores it and it is still in headers.
        transfer_encoding = self.headers.transfer_encoding or self.headers.get("TRANSFER_ENCODING")
        if transfer_encoding is None:
            return
        if "CONTENT_LENGTH" in self.headers:
            raise ParsingError("both Content-Length and Transfer-Encoding are set; send one of them")
        if self.version != "1.1" or transfer_encoding.strip(" \t").lower() != "chunked":
            raise ParsingError("Transfer-Encoding other than chunked (on HTTP/1.1) is not accepted")


class EnvelopeChannel(HTTPChannel):
    """waitress's connection handler, answering its own errors with EnvelopeErrorTask and refusing ambiguous
    framing with StrictFramingParser."""

    error_task_class = EnvelopeErrorTask
    parser_class = StrictFramingParser


def _listeners(server) -> list:
    """The listening servers: the server itself, or each one of a multi-socket server (IPv4 and IPv6, say); as
    they were when it was made (stop_listening takes them out of the map, and stop_server still needs them)."""
    known = getattr(server, "gateway_listeners", None)
    if known:
        return known
    listeners = [item for item in getattr(server, "map", {}).values() if hasattr(item, "channel_class")]
    return listeners or [server]


# Bytes waitress holds for one connection before a write to it blocks (its default is 16 MiB): what a client
# that stops reading costs in memory, until STREAM_STALL_TIMEOUT_S cuts its stream.
OUTBUF_HIGH_WATERMARK = 1024 * 1024


def make_server(app, *, host, port, threads, max_body_bytes, max_connections=4096, idle_timeout_s=30,
                outbuf_high_watermark=OUTBUF_HIGH_WATERMARK, trusted_proxy=None):
    """Create (not yet run) the waitress server for app; trusted_proxy: the address of a reverse proxy whose
    X-Forwarded-For names the client (REMOTE_ADDR), as waitress reads it."""
    epoll = wsgi_loop.available()
    # Behind a proxy every client would have the proxy's address: the admin key's lockout (policy/admin_guard.py)
    # would then lock everyone out for one guesser. Headers from any other peer are dropped, never believed.
    proxied = {"trusted_proxy": trusted_proxy, "trusted_proxy_count": 1,
               "trusted_proxy_headers": {"x-forwarded-for"}, "clear_untrusted_proxy_headers": True} \
        if trusted_proxy else {}
    server = waitress.create_server(app, host=host, port=port, threads=threads, ident="llama-gateway",
                                    # Linux: waitress's loop on epoll (wsgi_loop), over a map that tells it
                                    # which connections came and went.
                                    map=wsgi_loop.TrackedMap() if epoll else None,
                                    max_request_body_size=max_body_bytes,
                                    # Keep reading while a request runs, so waitress can tell that its client
                                    # has gone (waitress.client_disconnected) and llama.cpp can be cut off.
                                    channel_request_lookahead=5,
                                    # Connection floods (half-open or idle sockets): select() stops at 1024
                                    # descriptors, poll() does not (on Windows waitress uses select() anyway).
                                    asyncore_use_poll=True,
                                    connection_limit=max_connections,
                                    # waitress drops a connection idle this long (none of its requests running),
                                    # checked every cleanup_interval: so an idle one lives at most about twice it.
                                    channel_timeout=idle_timeout_s,
                                    cleanup_interval=min(10, idle_timeout_s),
                                    # A write blocks past this many unsent bytes, so that a slow reader's stream
                                    # waits (and the stall check sees it) instead of piling up in memory.
                                    outbuf_high_watermark=outbuf_high_watermark, **proxied)
    server.gateway_listeners = _listeners(server)
    for listener in server.gateway_listeners:
        listener.channel_class = EnvelopeChannel
    if epoll:
        server.asyncore = wsgi_loop.EpollAsyncore
    return server


def stop_listening(server):
    """Close the listening sockets (in the loop's own thread), so that no new connection is accepted."""
    listeners = _listeners(server)
    done = threading.Event()

    def close_listeners():
        for listener in listeners:
            wasyncore.dispatcher.close(listener)  # the listening socket only; not the loop's trigger
        done.set()

    listeners[0].trigger.pull_trigger(close_listeners)
    done.wait(5)


# After the last sockets are closed, how long the threads they freed get to end their requests (and log them).
THREADS_END_S = 2.0


def stop_server(server, timeout_s=5.0):
    """Stop a running server from another thread: let its threads finish and its output reach the clients (the
    app's close() runs before waitress writes a stream's last chunk) for at most timeout_s, then close every socket
    in the loop's own thread, so that run() returns and a thread still blocked writing is freed, and then stop the
    threads, giving them a moment to end their requests."""
    listener = _listeners(server)[0]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (server.task_dispatcher.active_count or any(
            getattr(channel, "total_outbufs_len", 0) for channel in list(listener._map.values()))):
        time.sleep(0.01)
    closed = threading.Event()

    def close_all():
        for channel in list(listener._map.values()):
            # A connection as waitress closes one (handle_close): its client marked gone, and a thread blocked
            # writing to it (a client that stopped reading) woken, to end its request with ClientDisconnected.
            # Its plain close() leaves that thread waiting for ever, and the request never logged.
            (channel.handle_close if isinstance(channel, HTTPChannel) else channel.close)()
        closed.set()

    # The sockets first: a thread blocked writing to a client that stopped reading ends only once its connection
    # is closed, and the dispatcher's shutdown would wait timeout_s more for it in vain.
    try:
        listener.trigger.pull_trigger(close_all)
    except OSError:
        # The loop's trigger is already closed: seen once in ~15 test runs (waitress closing from several
        # threads races, Pylons/waitress#468). Close what is left from here; with its map empty, the loop ends
        # at its next poll.
        log.warning("waitress's trigger was already closed at shutdown; closing its sockets directly")
        close_all()
    closed.wait(timeout_s)
    server.task_dispatcher.shutdown(timeout=timeout_s)
    _wait_for_threads(server.task_dispatcher, THREADS_END_S)


def _wait_for_threads(dispatcher, timeout_s):
    """Wait until every waitress thread has ended (told to by shutdown()), at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    while dispatcher.threads and time.monotonic() < deadline:
        time.sleep(0.01)
