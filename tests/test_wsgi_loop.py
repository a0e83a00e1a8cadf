"""waitress's loop on epoll (service/wsgi_loop.py): a turn asks only the connections that may have changed, a
full sweep each second asks them all, and connections that come and go (even on a reused descriptor) are
registered as they are."""
import socket

import pytest

from service import wsgi_loop
from tests.fakes import Clock

pytestmark = pytest.mark.skipif(not wsgi_loop.available(),
                                reason="epoll is Linux's: waitress's own loop runs elsewhere")


class Connection:
    """What the loop reads of a waitress channel, counting how often it is asked."""

    accepting = False

    def __init__(self, sock):
        self.sock = sock
        self.requests, self.total_outbufs_len, self.will_close, self.close_when_flushed = [], 0, False, False
        self.asked = 0
        self.reads = self.urgent = 0

    def readable(self):
        self.asked += 1
        return not self.will_close

    def writable(self):
        return self.will_close

    def handle_read_event(self):
        self.reads += 1
        self.sock.recv(100)

    def handle_write_event(self):
        self.will_close = False

    def handle_close(self):
        pass

    def handle_expt_event(self):
        self.urgent += 1


@pytest.fixture
def held():
    """50 connected socket pairs: the gateway's ends in a TrackedMap, the clients' ends by descriptor."""
    pairs = [socket.socketpair() for _ in range(50)]
    connections = {ours.fileno(): Connection(ours) for ours, _ in pairs}
    yield connections, {ours.fileno(): theirs for ours, theirs in pairs}
    for ours, theirs in pairs:
        ours.close(), theirs.close()


def test_a_turn_asks_only_connections_that_may_have_changed(held):
    connections, clients = held
    clock, tracked = Clock(), wsgi_loop.TrackedMap()
    tracked.update(connections)  # dict.update: as if added before the loop started
    tracked.changed.update(connections)
    loop = wsgi_loop.EpollLoop(tracked, clock=clock)
    loop.poll(0)
    assert all(connection.asked == 1 for connection in connections.values())  # the first sweep
    loop.poll(0)
    assert sum(connection.asked for connection in connections.values()) == 50  # steady ones: not asked again
    some_fd = next(iter(clients))
    clients[some_fd].send(b"GET / HTTP/1.1\r\n")
    loop.poll(1)
    assert connections[some_fd].reads == 1  # its event was dispatched
    loop.poll(0)
    assert connections[some_fd].asked == 2 and sum(c.asked for c in connections.values()) == 51
    clock.now += wsgi_loop.SWEEP_S
    loop.poll(0)
    assert all(connection.asked >= 2 for connection in connections.values())  # the sweep asks them all
    loop.close()


def test_a_connection_marked_by_waitress_upkeep_is_written_by_the_next_sweep(held):
    connections, _ = held
    clock, tracked = Clock(), wsgi_loop.TrackedMap()
    tracked.update(connections)
    tracked.changed.update(connections)
    loop = wsgi_loop.EpollLoop(tracked, clock=clock)
    loop.poll(0)
    idle = next(iter(connections.values()))
    idle.will_close = True  # what waitress's maintenance does to an idle connection, from no event
    loop.poll(0)
    assert idle.will_close  # not seen between sweeps
    clock.now += wsgi_loop.SWEEP_S
    loop.poll(0)  # the sweep registers it for writing
    loop.poll(0)  # and its write event comes
    assert not idle.will_close
    loop.close()


def test_connections_that_come_and_go_are_registered_even_on_a_reused_descriptor():
    tracked = wsgi_loop.TrackedMap()
    loop = wsgi_loop.EpollLoop(tracked, clock=Clock())
    ours, theirs = socket.socketpair()
    fd = ours.fileno()
    first = tracked[fd] = Connection(ours)
    loop.poll(0)
    # It closes, and within the same turn a new connection gets its descriptor (the kernel gives the lowest free
    # one): the kernel dropped the old one from the epoll set, so the new one must be registered anew.
    del tracked[fd]
    ours.close(), theirs.close()
    ours, theirs = socket.socketpair()
    assert ours.fileno() == fd
    second = tracked[fd] = Connection(ours)
    theirs.send(b"x")
    loop.poll(1)
    assert second.reads == 1 and first.reads == 0
    tracked.clear()
    loop.poll(0)
    assert loop.registered == {}
    loop.close()
    ours.close(), theirs.close()


def test_the_gateways_server_runs_on_it(make_app):
    from service.wsgi_server import make_server

    server = make_server(make_app("http://127.0.0.1:9"), host="127.0.0.1", port=0, threads=1, max_body_bytes=100)
    try:
        assert server.asyncore is wsgi_loop.EpollAsyncore and isinstance(server._map, wsgi_loop.TrackedMap)
    finally:
        server.close()


def test_a_connection_closed_by_another_thread_before_it_is_registered_is_closed_not_fatal():
    tracked = wsgi_loop.TrackedMap()
    loop = wsgi_loop.EpollLoop(tracked, clock=Clock())
    ours, theirs = socket.socketpair()
    connection = tracked[ours.fileno()] = Connection(ours)
    closed = []
    connection.handle_close = lambda: closed.append(True)
    ours.close()  # a task thread's failed write closed its socket; the loop has not yet seen it go
    loop.poll(0)  # registering it fails: the loop goes on, and the connection is closed as poll() would
    assert closed == [True]
    loop.close()
    theirs.close()


def test_an_urgent_byte_is_not_asked_for_so_the_loop_cannot_spin_on_it():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    tracked = wsgi_loop.TrackedMap()
    connection = tracked[ours.fileno()] = Connection(ours)
    loop = wsgi_loop.EpollLoop(tracked, clock=Clock())
    client.send(b"G", socket.MSG_OOB)  # waitress only logs it: under poll's POLLPRI every turn would see it again
    loop.poll(0.2)
    assert (connection.reads, connection.urgent) == (0, 0)
    loop.close()
    for sock in (ours, client, listener):
        sock.close()


def test_a_server_on_several_addresses_stops_cleanly(make_app, monkeypatch):
    import threading

    import waitress

    from service.wsgi_server import make_server, stop_listening, stop_server

    create = waitress.create_server
    monkeypatch.setattr(waitress, "create_server",
                        lambda app, host, port, **kw: create(app, listen="127.0.0.1:0 127.0.0.2:0", **kw))
    server = make_server(make_app("http://127.0.0.1:9"), host="x", port=0, threads=1, max_body_bytes=100)
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    stop_listening(server)
    stop_server(server)  # it needs the listeners' map and trigger, which stop_listening took out of the map
    loop.join(5)
    assert not loop.is_alive()
