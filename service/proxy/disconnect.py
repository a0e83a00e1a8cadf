"""Cut llama.cpp off when the client has gone: a generation nobody will read is wasted CPU.

waitress notices a vanished client only when it next writes to it, which may be minutes away (a long prompt,
a non-streamed answer). With waitress's channel_request_lookahead on, it puts waitress.client_disconnected
into the environ; one watcher thread polls that for every upstream call in flight and, for a client that has
gone, shuts the call's socket, so the blocked read ends at once and llama.cpp sees the connection close.
The same thread cuts a stream whose client has stopped reading (a StallClock says so), to free llama.cpp's slot.
"""
import logging
import secrets
import socket
import threading
import time

log = logging.getLogger(__name__)

# The call each request thread is making, for the connection class in upstream.py to report its socket to.
_current = threading.local()


class ClientGone(Exception):
    """The upstream call was cut (its client disconnected, or the gateway is shutting down)."""


# Why a call was cut.
CLIENT_LEFT = "client_left"
CLIENT_STALLED = "client_stalled"
SHUTDOWN = "shutdown"
# The operators' page's Cancel: cut as a client that left is, but its client is told (errors.CancelledByOperator).
CANCELLED = "cancelled_by_admin"


class UpstreamCall:
    """One upstream call, which another thread can cut.

    The socket it holds is only ever one its own request is using: a connection that goes back to urllib3's
    pool (a retry's backoff, a failover, an answer read to its end) detaches it first, because the next
    request on that connection belongs to another client. The lock makes detach and abort exclusive, so that
    once detach() has returned, no abort can shut that socket any more.
    """

    def __init__(self, record=None, stream=False):
        # The gateway's own name for this call, for the page's Cancel: a request id is the client's choice, and
        # two clients (or one, twice) may send the same one.
        self.handle = secrets.token_hex(6)
        self.record = record  # the request's RequestRecord (the page's list of requests in flight), if known
        self.stream = stream  # a streamed answer: the call stays watched while the stream is relayed
        self.sock = None  # the socket carrying it, once the request is sent; None between connections
        self.aborted = None  # why it was cut: CLIENT_LEFT, CLIENT_STALLED, CANCELLED or SHUTDOWN
        # How its first failed try that llama.cpp may have taken ended (upstream.UpstreamRetry notes it): urllib3
        # reports only the last failure, and a retry refused by a dead port must not make it look never sent.
        self.reached = None
        self.retries = 0  # the retries its tries took (upstream.UpstreamRetry counts them), for the request's log
        self._lock = threading.Lock()

    def __enter__(self):
        _current.call = self
        return self

    def __exit__(self, *exc):
        _current.call = None

    def attach(self, sock):
        """Note the socket carrying the call; cut it at once if the call was cut while none was attached."""
        with self._lock:
            self.sock = sock
            if self.aborted:
                self._shut()

    def detach(self, sock):
        """Forget sock (its connection is going back to the pool): no abort shuts it after this returns."""
        with self._lock:
            if self.sock is sock:
                self.sock = None

    def abort(self, reason=CLIENT_LEFT):
        """Mark the call cut and shut its socket, which wakes the thread blocked reading from it. Cut between
        connections (a retry's backoff), it sends nothing more (upstream.TrackedConnectionPool), and a request
        already on its way has its socket shut by attach()."""
        with self._lock:
            self.aborted = reason
            self._shut()

    def _shut(self):
        # Called with the lock held: a socket detached meanwhile is never shut.
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class StallClock:
    """Times a stream's writes to its client: waitress asks the relay for its next event only once the last
    one was written, and a write blocks while waitress holds outbuf_high_watermark bytes the client has not
    taken. A write that has not returned for timeout_s seconds is a stalled client."""

    def __init__(self, timeout_s: float, clock=time.monotonic):
        self.timeout = timeout_s
        self.clock = clock
        self.since = None  # when the write in progress began; None between writes

    def writing(self):
        """Note that an event was handed to the server."""
        self.since = self.clock()

    def written(self):
        """Note that the server asked for the next event (its write returned)."""
        self.since = None

    def stalled(self) -> bool:
        """Whether the write in progress has waited timeout_s or more."""
        since = self.since
        return since is not None and self.clock() - since >= self.timeout


def current_call():
    """The UpstreamCall this thread is making, if any."""
    return getattr(_current, "call", None)


class DisconnectWatch:
    """Knows every upstream call in flight; polls the clients of those it can every interval seconds, and cuts
    the calls of clients that have gone or stopped reading (or all calls, at shutdown)."""

    def __init__(self, interval_s=0.25):
        self.interval = interval_s
        self.closed = False  # the shutdown grace is over: every call is cut, those made from now on at once
        self._watched = {}
        self._lock = threading.Lock()
        self._thread = None

    def watch(self, call: UpstreamCall, client_gone=None, stalled=None) -> None:
        """Track call until unwatch(call), and cut it when client_gone() or stalled() (each if given) turns true;
        once closed (shutdown), cut it at once, so that it sends nothing upstream."""
        with self._lock:
            if self.closed:
                call.abort(SHUTDOWN)
                return
            self._watched[call] = (client_gone, stalled)
            if self._thread is None:
                # Started on first use, not when the app is built: nothing runs until there is work.
                self._thread = threading.Thread(target=self._run, name="disconnect-watch", daemon=True)
                self._thread.start()

    def unwatch(self, call: UpstreamCall) -> None:
        """Stop watching call."""
        with self._lock:
            self._watched.pop(call, None)

    def calls(self) -> list:
        """The calls in flight that belong to a request (have a record), for the operators' page."""
        with self._lock:
            return [call for call in self._watched if call.record is not None]

    def cancel(self, handle: str) -> bool:
        """Cut the request's call in flight with that handle (UpstreamCall.handle), as a client disconnect does:
        llama.cpp sees its connection close and frees the slot. Returns whether there was one."""
        with self._lock:
            found = [call for call in self._watched if call.record is not None and call.handle == handle]
            for call in found:
                del self._watched[call]
        for call in found:
            log.info("cancelled from the operators' page; closing its llama-server call",
                     extra={"fields": {"request_id": call.record.request_id, "handle": handle}})
            call.abort(CANCELLED)
        return bool(found)

    def _run(self):
        while True:
            threading.Event().wait(self.interval)
            with self._lock:
                cut = [(call, reason, checks[0]) for call, checks in self._watched.items()
                       for reason in [_reason(*checks)] if reason]
                for call, _, _ in cut:
                    del self._watched[call]
            for call, reason, client_gone in cut:
                log.info("client %s; closing its llama-server call",
                         "stopped reading" if reason == CLIENT_STALLED else "disconnected")
                call.abort(reason)
                if reason == CLIENT_STALLED:
                    close_client_connection(client_gone)

    def abort_all(self) -> int:
        """Cut every call in flight (the shutdown grace is over), and every call watched from now on; return how
        many were in flight."""
        with self._lock:
            self.closed = True
            calls = list(self._watched)
        for call in calls:
            call.abort(SHUTDOWN)
        return len(calls)


def close_client_connection(client_gone):
    """Close the connection of a client that stopped reading, from waitress's own loop (its channels are not
    thread-safe), so that the waitress thread blocked writing to it is freed at once rather than when the client
    reads or leaves. client_gone is the request's waitress.client_disconnected, a method of the connection's
    channel; under another server (or a waitress without it) nothing happens and the thread waits as before."""
    channel = getattr(client_gone, "__self__", None)
    trigger = getattr(getattr(channel, "server", None), "trigger", None)  # wakes the loop, runs a thunk there
    if callable(getattr(trigger, "pull_trigger", None)) and callable(getattr(channel, "handle_close", None)):
        trigger.pull_trigger(channel.handle_close)


def _reason(client_gone, stalled):
    """Why a watched call must be cut now, or None."""
    if client_gone and client_gone():
        return CLIENT_LEFT
    if stalled and stalled():
        return CLIENT_STALLED
    return None
