"""Graceful shutdown: stop taking requests, let those in flight finish within a grace period, end the rest."""
import logging
import threading
import time

from ..errors import ShuttingDown

log = logging.getLogger(__name__)

# Once the grace is over, how long the requests still running get to send their 503 (or error event) and write
# their log line: cut calls end at once, and waits for a model or a slot notice the cut within a quarter second.
CUT_WAIT_S = 5.0


class Lifecycle:
    """Counts requests in flight and drains them at shutdown."""

    def __init__(self, watch):
        self.watch = watch
        self.draining = False
        self.cut = False  # the grace is over: every wait ends with ShuttingDown and nothing more goes upstream
        self._in_flight = 0
        self._idle = threading.Condition()

    def begin(self):
        """A request arrives; refused with 503 once draining has begun."""
        with self._idle:
            self._in_flight += 1
        if self.draining:
            raise ShuttingDown()

    def end(self):
        """A request's response has been closed."""
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    def refuse_if_cut(self):
        """Raise ShuttingDown once the grace is over: a request still waiting (for its model, for a slot) ends
        there instead of being sent to a llama.cpp that is about to stop."""
        if self.cut:
            raise ShuttingDown()

    @property
    def in_flight(self) -> int:
        """Requests being answered now."""
        return self._in_flight

    def wait_idle(self, timeout_s) -> bool:
        """Wait until no request is in flight; False if timeout_s passed first."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def drain(self, grace_s) -> None:
        """Refuse new requests, give those in flight grace_s seconds, then end the rest: their upstream calls cut,
        their waits for a model or a slot ended, each answered (503, or a stream's error event) and logged."""
        self.draining = True
        log.info("draining", extra={"fields": {"in_flight": self.in_flight, "grace_s": grace_s}})
        if self.wait_idle(grace_s):
            return
        # First: a slot freed by a cut call must not send a waiting request upstream (service/proxy/admission.py).
        self.cut = True
        cut = self.watch.abort_all()  # and closes the watch: a call made from now on is cut before it is sent
        log.warning("grace period over; ending requests", extra={"fields": {"in_flight": self.in_flight,
                                                                          "upstream_calls_cut": cut}})
        # The process exits after this: wait for each request's answer and log line, within bounds.
        if not self.wait_idle(CUT_WAIT_S):
            log.warning("requests still running at exit", extra={"fields": {"in_flight": self.in_flight}})
