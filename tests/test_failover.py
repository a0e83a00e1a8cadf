"""Failover and ejection by kind of failure: what moves a request to another replica, how far it moves, and
which failures count against a replica (those that show it is unwell, never those its request could cause)."""
import socket
import threading

import pytest
from werkzeug import Response

from service.errors import UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from service.proxy.routing import ModelRoute
from tests.apps import routed_app
from tests.clients import chat
from tests.fakes import CHAT_ANSWER, LOADING, BrokenPeer, unused_port_url
from tests.metrics_helpers import replica_samples


@pytest.fixture
def stalled_url():
    """A loopback URL whose connects time out: its listener never accepts, and its queue is full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    queued = []
    try:
        # Linux queues backlog + 1 connections and then drops further SYNs, so that a connect hangs until its
        # timeout. Fill the queue until a connect times out: that is the proof.
        for _ in range(8):
            probe = socket.socket()
            probe.settimeout(0.1)
            try:
                probe.connect(address)
            except TimeoutError:
                probe.close()
                break
            except ConnectionRefusedError:  # Windows answers a full queue with a reset
                probe.close()
                pytest.skip("this system refuses connects past a full backlog: no connect timeout to be had")
            queued.append(probe)
        else:
            pytest.skip("the listener's queue never filled")
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        for probe in queued:
            probe.close()
        listener.close()


def test_the_stalled_listener_gives_a_connect_timeout(make_app, stalled_url):
    upstream = make_app(stalled_url, CHAT_CONNECT_TIMEOUT_S="0.1", UPSTREAM_RETRIES="0").extensions["upstream"]
    with pytest.raises(UpstreamUnavailable) as caught:
        upstream.request("POST", "/v1/chat/completions", group="chat", body=b"{}")
    assert caught.value.kind == "connect_timeout"


def test_a_connect_timeout_moves_to_another_replica(make_app, fake_upstreams, stalled_url):
    good, = fake_upstreams(1)
    good.expect_request("/v1/chat/completions").respond_with_json(CHAT_ANSWER)
    app = routed_app(make_app, {"chat": [stalled_url, good.url_for("")]}, CHAT_CONNECT_TIMEOUT_S="0.2")
    response = chat(app.test_client())
    assert response.status_code == 200 and response.get_json()["model"] == "chat"
    samples = replica_samples(app)
    assert samples[("gateway_replica_failures_total", "chat", stalled_url)] == 1  # tried first, and failed
    assert samples[("gateway_replica_requests_total", "chat", good.url_for("").rstrip("/"))] == 1


def test_a_request_moves_at_most_upstream_retries_times(make_app):
    dead = [unused_port_url() for _ in range(4)]
    app = routed_app(make_app, {"chat": dead}, UPSTREAM_RETRIES="1")
    response = chat(app.test_client())
    assert response.status_code == 502 and response.get_json()["error"]["code"] == "upstream_unavailable"
    samples = replica_samples(app)
    tried = sum(samples[("gateway_replica_failures_total", "chat", url)] for url in dead)
    assert tried == 2  # the first replica and one more


def test_with_every_replica_out_requests_still_go_to_them(make_app, fake_upstreams):
    first, second = fake_upstreams(2)
    for up in (first, second):
        for _ in range(2):
            up.expect_oneshot_request("/v1/chat/completions").respond_with_json(LOADING, status=503)
        up.expect_request("/v1/chat/completions").respond_with_json(CHAT_ANSWER)
    app = routed_app(make_app, {"chat": [first.url_for(""), second.url_for("")]}, REPLICA_EJECT_AFTER="2",
                     REPLICA_COOLDOWN_S="60")
    client = app.test_client()
    for _ in range(2):  # each tries both replicas, which both answer 503 twice: both are out
        assert chat(client).status_code == 503
    samples = replica_samples(app)
    assert [samples[("gateway_replica_up", "chat", up.url_for("").rstrip("/"))] for up in (first, second)] == [0, 0]
    response = chat(client)  # out, but better asked than refused unasked
    assert response.status_code == 200 and response.get_json()["model"] == "chat"
    assert sum(replica_samples(app)[("gateway_replica_up", "chat", up.url_for("").rstrip("/"))]
               for up in (first, second)) == 1  # the one that answered is back


# Failures a request's own content can cause: llama.cpp took it, then failed on it or took too long.
CONTENT_FAILURES = {
    "500": lambda: UpstreamBadResponse("answered HTTP 500", kind="5xx", upstream_status=500),
    "read timeout": lambda: UpstreamTimeout("did not answer within 1 s"),
}
# Failures that show the replica itself is unwell: it never took the request.
REPLICA_FAILURES = {
    "refused": lambda: UpstreamUnavailable("connection refused"),
    "connect timeout": lambda: UpstreamUnavailable("no connection within 1 s", kind="connect_timeout"),
    "closed before any answer": lambda: UpstreamUnavailable("connection closed before any answer"),
    "502": lambda: UpstreamBadResponse("answered HTTP 502", kind="5xx", upstream_status=502),
    "503": lambda: UpstreamUnavailable("cannot serve yet", status=503, kind="loading", upstream_status=503),
}


@pytest.mark.parametrize("make_error", CONTENT_FAILURES.values(), ids=CONTENT_FAILURES.keys())
def test_failures_a_request_can_cause_never_eject(make_error):
    route = ModelRoute("chat", ["http://a", "http://b"], eject_after=2)
    a, _ = route.replicas
    for _ in range(10):
        route.failed(a, make_error())
    assert not a.ejected and a.failures == 0
    assert a.failed == 10  # still counted in gateway_replica_failures_total


@pytest.mark.parametrize("make_error", REPLICA_FAILURES.values(), ids=REPLICA_FAILURES.keys())
def test_failures_of_the_replica_eject_it(make_error):
    route = ModelRoute("chat", ["http://a", "http://b"], eject_after=2)
    a, _ = route.replicas
    route.failed(a, make_error())
    assert not a.ejected
    route.failed(a, make_error())
    assert a.ejected and a.ejections == 1


@pytest.mark.parametrize("failure", ["500", "read timeout"])
def test_one_clients_bad_requests_cannot_eject_every_replica(make_app, fake_upstreams, failure):
    release = threading.Event()
    replicas = fake_upstreams(2)
    for up in replicas:
        up.expect_request("/health").respond_with_json({"status": "ok"})
        if failure == "500":  # as llama.cpp answers a body its exception wrapper catches
            up.expect_request("/v1/chat/completions").respond_with_json(
                {"error": {"code": 500, "message": "bad input", "type": "server_error"}}, status=500)
        else:
            up.expect_request("/v1/chat/completions").respond_with_handler(
                lambda request: release.wait(5) and Response("{}"))
    app = routed_app(make_app, {"chat": [up.url_for("") for up in replicas]}, REPLICA_EJECT_AFTER="2",
                     CHAT_READ_TIMEOUT_S="0.2", HEALTH_CACHE_S="0")
    client = app.test_client()
    try:
        statuses = {chat(client).status_code for _ in range(4)}  # two on each replica, as many as eject
    finally:
        release.set()
    assert statuses == {502 if failure == "500" else 504}
    samples = replica_samples(app)
    for up in replicas:
        url = up.url_for("").rstrip("/")
        assert samples[("gateway_replica_failures_total", "chat", url)] == 2
        assert samples[("gateway_replica_ejections_total", "chat", url)] == 0
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["models"]["chat"]["status"] == "ok"


@pytest.mark.parametrize("failure", ["refused", "closed before any answer", "503"])
def test_a_replica_that_cannot_take_requests_is_ejected_after_eject_after(make_app, fake_upstreams, failure):
    bad, good = fake_upstreams(2)
    good.expect_request("/v1/chat/completions").respond_with_json(CHAT_ANSWER)
    peer = BrokenPeer(lambda peer, conn: None)  # reads the request, then closes without a word
    try:
        bad_url = {"refused": unused_port_url(), "closed before any answer": peer.url}.get(failure)
        if bad_url is None:
            bad.expect_request("/v1/chat/completions").respond_with_json(LOADING, status=503)
            bad_url = bad.url_for("").rstrip("/")
        app = routed_app(make_app, {"chat": [bad_url, good.url_for("")]}, REPLICA_EJECT_AFTER="2",
                         REPLICA_COOLDOWN_S="60")
        client = app.test_client()
        statuses = [chat(client).status_code for _ in range(6)]
        if failure == "closed before any answer":
            # It may have read the request and died on it: never sent to another replica, the client is told.
            assert sorted(statuses) == [200] * 4 + [502] * 2
        else:
            assert set(statuses) == {200}  # each failure moved to the good one
    finally:
        peer.close()
    samples = replica_samples(app)
    assert samples[("gateway_replica_failures_total", "chat", bad_url)] == 2  # then it was out of rotation
    assert samples[("gateway_replica_ejections_total", "chat", bad_url)] == 1
