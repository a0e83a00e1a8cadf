"""Graceful shutdown: stop taking requests, let those in flight finish within a grace period, end the rest."""
import logging
import threading
import time

from ..errors import ShuttingDown

log = logging.getLogger(__name__)


class Lifecycle:
    """Counts requests in flight and drains them at shutdown."""

    def __init__(self, watch):
        self.watch = watch
        self.draining = False
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
        """Refuse new requests, give those in flight grace_s seconds, then cut their upstream calls."""
        self.draining = True
        log.info("draining", extra={"fields": {"in_flight": self.in_flight, "grace_s": grace_s}})
        if self.wait_idle(grace_s):
            return
        cut = self.watch.abort_all()
        log.warning("grace period over; ending requests", extra={"fields": {"in_flight": self.in_flight,
                                                                          "upstream_calls_cut": cut}})
        # Cut calls end within moments: streams send their error event and close.
        self.wait_idle(5)

