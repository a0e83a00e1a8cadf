"""waitress's event loop on epoll, asking only the connections that may have changed what they wait for.

waitress's own loop (wasyncore.poll2) asks every connection readable()/writable() and registers each one anew on
every turn, so a turn costs time in proportion to the connections held: with 5,000 idle or half-open ones, about
4 ms a turn, and a request takes several turns. Here the registrations live in one epoll set, and a turn asks only
the connections that had an event, were added, or have requests running (their tasks change what they wait for).
A connection with nothing running that waits only to read stays registered as it is until it has an event: the
only way it changes then is by waitress's own upkeep (closing idle ones), which a full sweep each second catches.

Linux only (epoll); elsewhere waitress's own loop runs (select() on Windows).
"""
import select
import threading
import time
from errno import EINTR

from waitress import wasyncore

# poll()'s flags, which wasyncore.readwrite reads, and which epoll's equal on Linux. Windows has neither (nor
# these names): there this module is imported but never used. Not POLLPRI, which waitress's own loop asks for: one
# TCP urgent byte from a client keeps it set, and waitress only logs it, so its loop would spin until the client
# left (waitress's handle_expt); unasked, the byte is ignored.
READ = getattr(select, "POLLIN", 0)
WRITE = getattr(select, "POLLOUT", 0)
NOT_OPEN = getattr(select, "POLLNVAL", 0)
# Every connection is asked again this often: what changes a connection without an event (waitress's upkeep marks
# idle ones to close) is seen within this long.
SWEEP_S = 1.0


class TrackedMap(dict):
    """waitress's map of file descriptors to connections, noting which descriptors were added or removed."""

    def __init__(self):
        super().__init__()
        self.changed = set()
        # Task threads close connections too (waitress, when a write fails): the loop takes the changes whole.
        self._lock = threading.Lock()

    def __setitem__(self, fd, channel):
        with self._lock:
            super().__setitem__(fd, channel)
            self.changed.add(fd)

    def __delitem__(self, fd):
        with self._lock:
            super().__delitem__(fd)
            self.changed.add(fd)

    def pop(self, fd, *default):
        """Remove fd, noting it."""
        with self._lock:
            self.changed.add(fd)
            return super().pop(fd, *default)

    def clear(self):
        """Remove every descriptor, noting them."""
        with self._lock:
            self.changed.update(self)
            super().clear()

    def take_changed(self) -> set:
        """The descriptors added or removed since the last call."""
        with self._lock:
            changed, self.changed = self.changed, set()
        return changed


def _wanted(channel) -> int:
    """The events a connection waits for now, as wasyncore.poll2 computes them."""
    flags = READ if channel.readable() else 0
    if channel.writable() and not channel.accepting:
        flags |= WRITE
    return flags


def _steady(channel) -> bool:
    """True for a connection nothing can change until it has an event: no request running, nothing to send."""
    return (not getattr(channel, "requests", True) and not getattr(channel, "total_outbufs_len", 1)
            and not getattr(channel, "will_close", True) and not getattr(channel, "close_when_flushed", True))


class EpollLoop:
    """One epoll set for one waitress map; poll() is one turn of the loop."""

    def __init__(self, map, clock=time.monotonic):
        self.map = map
        self.clock = clock
        self.epoll = select.epoll()
        self.registered = {}  # fd -> (channel, flags registered)
        self.busy = set()  # fds asked on every turn: not steady, or not yet seen steady
        self.swept = float("-inf")

    def poll(self, timeout):
        """Bring the registrations up to date, wait up to timeout seconds, and dispatch the events."""
        self._update()
        try:
            events = self.epoll.poll(-1 if timeout is None else timeout)
        except OSError as error:
            if error.args[0] != EINTR:
                raise
            events = []
        for fd, flags in events:
            channel = self.map.get(fd)
            if channel is None:
                continue
            self.busy.add(fd)  # it may want something else now
            wasyncore.readwrite(channel, flags)

    def _update(self):
        changed = self.map.take_changed()
        for fd in changed:
            if fd not in self.map:
                self._forget(fd)
        now = self.clock()
        if now - self.swept >= SWEEP_S:
            self.swept = now
            asked = list(self.map)
        else:
            asked = list(self.busy | {fd for fd in changed if fd in self.map})
        for fd in asked:
            channel = self.map.get(fd)
            if channel is None:
                self.busy.discard(fd)
                continue
            # Steady first: once seen steady no task can change it, so the flags read after it are the lasting ones
            # (read the other way round, a task ending in between could leave a connection registered for
            # nothing until the next sweep).
            steady = _steady(channel)
            self._register(fd, channel, _wanted(channel))
            if steady:
                self.busy.discard(fd)
            else:
                self.busy.add(fd)

    def _register(self, fd, channel, flags):
        known = self.registered.get(fd)
        if known is not None and known[0] is channel and known[1] == flags:
            return
        if known is not None:
            self._forget(fd)
        if not flags:  # as poll2: a connection that waits for nothing is not registered (nor told of a hang-up)
            return
        try:
            self.epoll.register(fd, flags)
        except OSError:
            # Closed meanwhile by another thread (a task whose write failed): gone from the map, or about to be.
            # poll() would say POLLNVAL of it, which closes it: do the same.
            if self.map.get(fd) is channel:
                wasyncore.readwrite(channel, NOT_OPEN)
            return
        self.registered[fd] = (channel, flags)

    def _forget(self, fd):
        if self.registered.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass  # closed already: the kernel dropped it from the set
        self.busy.discard(fd)

    def close(self):
        """Close the epoll set."""
        self.epoll.close()


class EpollAsyncore:
    """What waitress's server calls as its `asyncore` (its loop): the epoll loop above over a TrackedMap."""

    @staticmethod
    def loop(timeout=30.0, use_poll=False, map=None, count=None):
        """Run turns while map holds anything (or count turns), as wasyncore.loop does."""
        turns = EpollLoop(map)
        try:
            while map and (count is None or count > 0):
                turns.poll(timeout)
                if count is not None:
                    count -= 1
        finally:
            turns.close()


def available() -> bool:
    """True where epoll exists (Linux)."""
    return hasattr(select, "epoll")
