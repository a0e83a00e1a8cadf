"""The one requests.Session to llama-server: pooled connections, urllib3 Retry with backoff, per-route timeouts.

Every failure of the upstream is translated into the gateway's own exceptions here and only here (its error
answers by upstream_errors.py, which this module alone calls).
"""
import collections
import http.client
import json
import threading
import time

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, ProtocolError, ReadTimeoutError, ResponseError
from urllib3.util.retry import Retry

from ..converters import public_url
from ..errors import (CancelledByOperator, ClientClosedRequest, ShuttingDown, UpstreamBadResponse, UpstreamError,
                     UpstreamTimeout, UpstreamUnavailable)
from .disconnect import CANCELLED, SHUTDOWN, ClientGone, UpstreamCall, current_call
from .upstream_errors import status_error

# What a relayed non-chunked stream reads at most per socket read; read1 returns as soon as any bytes arrive.
STREAM_READ_BYTES = 64 * 1024


class UpstreamRetry(Retry):
    """urllib3's Retry, with five changes for llama-server.

    A connection closed before any byte of an answer counts as a connect failure, so it is retried: most often
    a kept-alive connection the server had just dropped, which never took the request. That retry is made even
    where the budget is 0 (a replica that others back up): the close cannot fail over to another replica, since
    a llama.cpp that read the request and died looks the same. So the call remembers that try
    (UpstreamCall.reached) for its verdict, and gets that one more try and no more: a retry that lands on a
    restarted llama.cpp would run it again. A call cut because its client left (or the gateway is stopping) is
    never retried. Each retry made is counted on the call (UpstreamCall.retries). And an upstream's Retry-After
    never waits longer than backoff_max.
    """

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        """Count a failure as urllib3 does, but never retry a call cut because its client left, and stop after
        the one retry of a try that llama.cpp may have taken."""
        call = current_call()
        if call is None:
            return super().increment(method, url, response, error, _pool, _stacktrace)
        if call.aborted:
            raise ClientGone()
        reached_before = call.reached
        if error is not None and not reached_before and not isinstance(error, ConnectTimeoutError):
            call.reached = describe_connection_error(error)  # it connected (refused is a ConnectTimeoutError too)
        budget = self
        if not reached_before and _closed_unanswered(error):
            # Its one retry whatever the budget: a stale kept-alive connection must not cost the client a 502.
            budget = self.new(total=max(self.total, 1), connect=max(self.connect, 1))
        retry = super(UpstreamRetry, budget).increment(method, url, response, error, _pool, _stacktrace)
        if reached_before:
            # Where urllib3 would try again: not this time. An answer (a 503) is then handed back as it is.
            raise MaxRetryError(_pool, url, error or ResponseError(f"HTTP {response.status}")) from error
        call.retries += 1  # super() raises where urllib3 would not retry: only a retry about to be made gets here
        return retry

    def _is_connection_error(self, err):
        return _closed_unanswered(err) or super()._is_connection_error(err)

    def get_retry_after(self, response):
        """Return the Retry-After delay, capped so that a request never sleeps for an hour."""
        delay = super().get_retry_after(response)
        return None if delay is None else min(delay, self.backoff_max)


def _closed_unanswered(error) -> bool:
    """True for a connection closed before any byte of an answer (http.client's RemoteDisconnected, which
    urllib3 wraps in a ProtocolError)."""
    return isinstance(error, ProtocolError) and any(
        isinstance(arg, http.client.RemoteDisconnected) for arg in error.args)


def make_retry(retries: int, backoff: float, backoff_max: float) -> Retry:
    """Retry connect failures and 502/503/504 answers, retries times (a connection closed before any answer
    once, whatever retries says); never a read error, so no generation runs twice."""
    return UpstreamRetry(
        total=retries,
        connect=retries,
        status=retries,
        read=False,  # once the request is sent, an error is final: llama.cpp may already be generating
        other=0,
        allowed_methods=None,  # POST too: these failures all happen before llama.cpp accepted the work
        status_forcelist=(502, 503, 504),
        backoff_factor=backoff,
        backoff_max=backoff_max,
        respect_retry_after_header=True,
        raise_on_status=False,  # hand back the last answer so its status and message reach the client
    )


class TrackedConnection(HTTPConnection):
    """A connection that hands the socket of each request it sends to the UpstreamCall made on this thread, and
    takes it back when it returns to the pool."""

    _call = None  # the UpstreamCall its current request belongs to
    _call_sock = None  # the socket it attached to that call

    def request(self, *args, **kwargs):
        """Send a request, then tell the current UpstreamCall (if any) which socket carries it."""
        result = super().request(*args, **kwargs)
        call = current_call()
        if call is not None:
            # The socket object itself: http.client drops the connection's reference when a response
            # takes the socket over (Connection: close), but the response keeps it open.
            self._call, self._call_sock = call, self.sock
            call.attach(self.sock)
        return result

    def release_call(self):
        """Detach this connection's socket from its call: the next request on it may be another client's."""
        call, sock = self._call, self._call_sock
        self._call = self._call_sock = None
        if call is not None:
            call.detach(sock)


class TrackedConnectionPool(HTTPConnectionPool):
    """urllib3's pool of TrackedConnections: a call cut while it holds none sends nothing more upstream, and
    a connection going back to the pool is detached from its call first."""

    ConnectionCls = TrackedConnection

    def urlopen(self, *args, **kwargs):
        """Send as urllib3 does, unless the call was cut meanwhile (say during a retry's backoff)."""
        call = current_call()
        if call is not None and call.aborted:
            raise ClientGone()  # runs again for each retry: urllib3 retries by calling urlopen
        return super().urlopen(*args, **kwargs)

    def _put_conn(self, conn):
        # Every way back into the pool passes here (the answer read to its end, a retry draining an error
        # answer, a response's release): from now on the connection's socket is not the call's to cut.
        if conn is not None:
            conn.release_call()
        super()._put_conn(conn)


class Upstream:
    """llama-servers reached through one pooled Session: each base URL has its own pool and retry budget."""

    def __init__(self, targets, *, timeouts, pool_size=8, backoff=0.25, backoff_max=8.0, api_key=None):
        """targets maps each base URL to its retries (0 for a replica that another replica backs up)."""
        self.timeouts = timeouts
        self.session = requests.Session()
        # Not from the environment: HTTP_PROXY and friends must not reroute calls to a llama-server next door,
        # and requests would otherwise re-read the whole environment (and look for .netrc) on every call.
        self.session.trust_env = False
        self.session.headers.update({"Accept-Encoding": "identity", "Content-Type": "application/json"})
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.retries = {}
        self._adapter_options = (pool_size, backoff, backoff_max)
        self._mounting = threading.Lock()
        for base_url, retries in targets.items():
            self.add_target(base_url, retries)
        self.base_url = next(iter(targets))  # where calls go that name no base URL
        self._templates = {}

    def add_target(self, base_url, retries):
        """Mount the adapters of a llama-server at base_url with its retries (a model added, or a replica moved,
        while the gateway runs); nothing to do for a target already mounted with those retries."""
        with self._mounting:
            if self.retries.get(base_url) == retries:
                return
            pool_size, backoff, backoff_max = self._adapter_options
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, pool_block=False,
                                  max_retries=make_retry(retries, backoff, backoff_max))
            adapter.poolmanager.pool_classes_by_scheme = {**adapter.poolmanager.pool_classes_by_scheme,
                                                          "http": TrackedConnectionPool}
            mounts = {base_url: adapter}
            if base_url not in self.retries:
                # Health is polled often and must say at once what is wrong, so it gets no retries; /metrics
                # (health, scrapes) neither; /props is asked on a request's path once, and a failure there means
                # "slots unknown", not a wait.
                mounts.update((base_url + path, HTTPAdapter(pool_maxsize=2, max_retries=0))
                              for path in ("/health", "/metrics", "/props"))
            # A new table in place of the old, never the old one changed: requests picks an adapter by walking
            # the table, which a request on another thread may be doing right now. Longest prefix first, as
            # Session.mount keeps it.
            adapters = {**self.session.adapters, **mounts}
            self.session.adapters = collections.OrderedDict(sorted(adapters.items(), key=lambda item: -len(item[0])))
            self.retries[base_url] = retries

    def close(self):
        """Close every pooled connection."""
        self.session.close()

    def request(self, method, path, *, group, base_url=None, body=None, stream=False, headers=None, record=None,
                call=None):
        """Send one request to base_url (by default the first); return a response with a status below 400 or
        raise an UpstreamError.

        record, if given, gets the time to the upstream's answer (upstream_ms) and the retries it took; call,
        if given, is an UpstreamCall that another thread may cut (ClientClosedRequest then).
        """
        base_url = base_url or self.base_url
        connect_timeout, read_timeout = self.timeouts[group]
        prepared = self._prepared(method, base_url + path, stream, body, headers)
        started = time.perf_counter()
        tracked = call or UpstreamCall()  # its tries are judged together, the failed ones by UpstreamRetry
        retries_before = tracked.retries  # a call sent before (another replica, before a restart) counted those
        try:
            with tracked:
                # Redirects are never followed: a llama-server does not send them, and no call may go elsewhere.
                response = self.session.send(prepared, stream=stream, timeout=(connect_timeout, read_timeout),
                                             allow_redirects=False)
        except ClientGone:
            raise _cut(call) from None
        except requests.RequestException as error:
            if call is not None and call.aborted:
                raise _cut(call) from None
            raise _translate(error, base_url, path, connect_timeout, read_timeout, tracked.reached) from None
        finally:
            if record is not None:
                record.upstream_ms = round((time.perf_counter() - started) * 1000, 2)
                # The retries this request made (a call that failed may have stopped short of its budget).
                record.retries = tracked.retries - retries_before
        if response.status_code >= 400:
            raise status_error(response, path)
        return response

    def _prepared(self, method, url, stream, body, headers):
        """The request to send, copied from a template prepared once per method, URL and kind: preparing one
        from scratch (URL parsing, merging the Session's headers, cookies and hooks) costs ~90 µs a call."""
        key = (method, url, stream)
        template = self._templates.get(key)
        if template is None:
            # llama.cpp tends to drop a connection after a stream; never put one back in the pool.
            template = self.session.prepare_request(
                requests.Request(method, url, headers={"Connection": "close"} if stream else None))
            self._templates[key] = template  # a few per upstream: methods x paths x replicas
        prepared = template.copy()
        if body is not None:
            prepared.body = body
            prepared.headers["Content-Length"] = str(len(body))
        if headers:
            prepared.headers.update(headers)
        return prepared

    def healthy(self, base_url) -> bool:
        """True when the llama-server at base_url answers its /health with 200 (loaded and serving)."""
        try:
            self.request("GET", "/health", group="models", base_url=base_url).close()
        except UpstreamError:
            return False
        return True

    def read_json(self, response, path, kinds=(dict,)) -> tuple:
        """Return the whole body of a non-streamed answer and its parsed JSON, checked to be of kinds (an object)."""
        body = response.content  # already read: the Session read it inside request()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if not isinstance(parsed, kinds):
            raise UpstreamBadResponse(f"llama-server's answer to {path} is not a JSON object")
        return body, parsed

    def iter_stream(self, response, group, call=None):
        """Yield the raw bytes of a streamed answer as they arrive; raise an UpstreamError if it breaks, or
        ClientClosedRequest if call was cut because its client left."""
        read_timeout = self.timeouts[group][1]
        try:
            yield from _arriving_bytes(response.raw)
        except (Urllib3Error, OSError) as error:
            if call is not None and call.aborted:
                raise _cut(call) from None
            if isinstance(error, ReadTimeoutError):
                raise UpstreamTimeout(f"llama-server went silent mid-stream for {read_timeout:g} s") from None
            raise UpstreamBadResponse(f"llama-server broke off the stream: {describe_connection_error(error)}") \
                from None
        if call is not None and call.aborted:
            raise _cut(call)


def _translate(error, base_url, path, connect_timeout, read_timeout, reached=None) -> UpstreamError:
    """Translate a requests exception into the gateway's own. reached: how an earlier try that llama.cpp may
    have taken ended (urllib3 reports only the last try, which may well be refused by the port it died on)."""
    shown = public_url(base_url)
    if isinstance(error, requests.ConnectTimeout):
        words, kind = f"no connection within {connect_timeout:g} s", "connect_timeout"
    elif isinstance(error, requests.ReadTimeout):
        return UpstreamTimeout(f"llama-server did not answer {path} within {read_timeout:g} s")
    elif isinstance(error, requests.ConnectionError):
        words = describe_connection_error(error)
        # Refused: that try never reached llama.cpp. Anything else (closed before any answer too) may have.
        kind = "refused" if words in NEVER_REACHED else "reset"
    else:
        return UpstreamBadResponse(f"llama-server's answer to {path} was cut off or malformed: {type(error).__name__}")
    if reached and reached != words:
        # Judged by every try: one that llama.cpp may have taken (and died of) makes the call one that it may have.
        words, kind = f"{reached}, then {words}", "reset"
    return UpstreamUnavailable(f"could not reach llama-server at {shown}: {words}", kind=kind)


def _cut(call):
    """The error for a call that another thread cut, by why it was cut: its client left (or stopped reading),
    the gateway is stopping, or an operator cancelled it on the page."""
    errors = {SHUTDOWN: ShuttingDown, CANCELLED: CancelledByOperator}
    return errors.get(call.aborted, ClientClosedRequest)()


def _arriving_bytes(raw):
    """Yield a body's bytes as they arrive: chunk by chunk when chunked (llama.cpp writes an event per chunk),
    else whatever each socket read returns."""
    if raw.chunked and raw.supports_chunked_reads():
        yield from raw.read_chunked(decode_content=False)
        return
    while data := raw.read1(STREAM_READ_BYTES, decode_content=False):
        yield data


def describe_connection_error(error) -> str:
    """Name the underlying socket failure (refused, reset, cut off) from under urllib3's wrapping."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        for kind, words in _SOCKET_FAILURES:
            if isinstance(current, kind):
                return words
        nested = (current.__cause__, current.__context__, getattr(current, "reason", None), *current.args)
        pending.extend(item for item in nested if isinstance(item, BaseException))
    return type(error).__name__


# The one connection failure that shows a request never reached llama.cpp (describe_connection_error's words):
# a connection closed before any answer may have been closed by a llama.cpp that read the request and then died.
NEVER_REACHED = ("connection refused",)

# Most specific first: RemoteDisconnected is a ConnectionResetError.
_SOCKET_FAILURES = (
    (ConnectionRefusedError, "connection refused"),
    (http.client.RemoteDisconnected, "connection closed before any answer"),
    (ConnectionResetError, "connection reset"),
    (http.client.IncompleteRead, "the answer was cut off"),
    (TimeoutError, "timed out"),
)
