"""Routing by model: the route of each name, least-busy balancing, failover before any answer, ejection and
probing back, and what the client, the log and the metrics see of it."""
import json
import logging
import threading
import time

import pytest
from werkzeug import Response

from service.config import ConfigError, load_settings
from service.errors import UpstreamUnavailable
from service.proxy.routing import ModelRoute
from tests.apps import routed_app
from tests.clients import assert_openai_envelope, chat
from tests.fakes import CHAT_ANSWER, unused_port_url
from tests.metrics_helpers import replica_samples

CHAT = "/v1/chat/completions"


def test_least_busy_replica_wins_and_ties_go_round_robin():
    route = ModelRoute("chat", ["http://a", "http://b", "http://c"])
    a, b, c = route.replicas
    assert [route.pick().url for _ in range(3)] == ["http://a", "http://b", "http://c"]
    a.release(), c.release()
    assert route.pick() is a and route.pick() is c  # b is still busy
    b.release()
    assert route.pick() is b
    assert (a.in_flight, b.in_flight, c.in_flight) == (1, 1, 1)


def test_ejected_after_failures_in_a_row_and_back_only_after_a_probe():
    clock = [0.0]
    probes = []
    route = ModelRoute("chat", ["http://a", "http://b"], eject_after=2, cooldown_s=5, clock=lambda: clock[0],
                       probe=lambda url: probes.append(url) or True)
    a, b = route.replicas
    error = UpstreamUnavailable("refused")
    route.failed(a, error)
    assert not a.ejected
    route.failed(a, error)
    assert a.ejected and a.ejections == 1
    assert {route.pick().url for _ in range(4)} == {"http://b"}  # out of rotation during the cooldown
    clock[0] = 5.0
    route.pick()  # past the cooldown: the pick starts a probe in the background
    deadline = time.monotonic() + 5
    while a.ejected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert probes == ["http://a"] and not a.ejected and a.failures == 0


def test_a_failed_probe_rests_the_replica_again():
    clock = [0.0]
    route = ModelRoute("chat", ["http://a", "http://b"], eject_after=1, cooldown_s=5, clock=lambda: clock[0])
    a, _ = route.replicas
    route.failed(a, UpstreamUnavailable("refused"))
    clock[0] = 6.0
    route.probed(a, False)
    assert a.ejected_until == 11.0
    route.probed(a, True)  # still inside the new cooldown: no effect
    assert a.ejected
    clock[0] = 11.0
    route.probed(a, True)
    assert not a.ejected


def test_a_health_probe_leaves_the_routing_probe_of_a_replica_running_alone():
    clock, entered, release, probes = [0.0], threading.Event(), threading.Event(), []

    def probe(url):
        probes.append(url)
        entered.set()
        release.wait(5)
        return False

    route = ModelRoute("chat", ["http://a", "http://b"], eject_after=1, cooldown_s=5, clock=lambda: clock[0],
                       probe=probe)
    a, _ = route.replicas
    route.failed(a, UpstreamUnavailable("refused"))
    clock[0] = 5.0
    route.pick()  # past the cooldown: starts the routing probe, which hangs in probe()
    assert entered.wait(5)
    route.probed(a, False)  # meanwhile /health probes a too, and is told no: a rests again
    assert a.probing  # the routing probe still runs: only it may say it ended
    clock[0] = 10.0
    route.pick()  # past the new cooldown, but a's probe has not ended: no second one
    running = [thread for thread in threading.enumerate() if thread.name == "replica-probe"]
    release.set()
    for thread in running:
        thread.join(5)
    assert probes == ["http://a"] and not a.probing and a.ejected


def test_unknown_model_is_404_model_not_found(make_app, fake_upstreams):
    up, = fake_upstreams(1)
    client = routed_app(make_app, {"chat": [up.url_for("")]}).test_client()
    response = chat(client, model="gpt-4o")
    error = assert_openai_envelope(response, 404)
    assert error["code"] == "model_not_found" and error["param"] == "model" and "gpt-4o" in error["message"]
    assert up.url_for("") not in error["message"]  # nothing about the upstreams
    error = assert_openai_envelope(client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]}), 400)
    assert error["param"] == "model"
    assert not up.log


def test_each_model_goes_to_its_own_upstream_and_gets_its_own_name_back(make_app, fake_upstreams):
    chat_up, embed_up = fake_upstreams(2)
    chat_up.expect_request(CHAT).respond_with_json(CHAT_ANSWER)
    embed_up.expect_request("/v1/embeddings").respond_with_json(
        {"object": "list", "model": "e.gguf", "data": [], "usage": {"prompt_tokens": 1, "total_tokens": 1}})
    client = routed_app(make_app, {"chat": [chat_up.url_for("")], "embed": [embed_up.url_for("")]}).test_client()
    assert chat(client).get_json()["model"] == "chat"
    assert client.post("/v1/embeddings", json={"model": "embed", "input": "x"}).get_json()["model"] == "embed"
    assert len(chat_up.log) == 1 and len(embed_up.log) == 1
    assert json.loads(chat_up.log[0][0].data)["model"] == "chat"  # the client's bytes, as sent


def test_only_the_answers_own_model_member_is_renamed(make_app, fake_upstreams):
    # Anthropic's tool_use input is an object: a "model" inside it is what the model said, not its name.
    up, = fake_upstreams(1)
    answer = {"id": "msg_1", "type": "message", "model": "f.gguf", "content": [
        {"type": "tool_use", "id": "t1", "name": "pick", "input": {"model": "gpt-4o", "note": "caf\u00e9"}}],
        "usage": {"input_tokens": 3, "output_tokens": 4}}
    up.expect_request("/v1/messages").respond_with_json(answer)
    client = routed_app(make_app, {"chat": [up.url_for("")]}).test_client()
    body = client.post("/v1/messages", json={"model": "chat", "max_tokens": 5,
                                             "messages": [{"role": "user", "content": "hi"}]}).get_json()
    assert body == {**answer, "model": "chat"}


def test_renames_every_chunk_of_a_stream(make_app, fake_upstreams):
    up, = fake_upstreams(1)
    chunk = b'data: {"choices":[{"delta":{"content":"\\"model\\":\\"x\\""}}],"model":"f.gguf"}\n\n'
    up.expect_request(CHAT).respond_with_response(Response(chunk * 2 + b"data: [DONE]\n\n",
                                                           content_type="text/event-stream"))
    client = routed_app(make_app, {"chat": [up.url_for("")]}).test_client()
    text = chat(client, stream=True, stream_options={"include_usage": True}).get_data()
    assert text == chunk.replace(b'"model":"f.gguf"', b'"model":"chat"') * 2 + b"data: [DONE]\n\n"


@pytest.mark.parametrize("failure", ["refused", 502, 503])
def test_moves_to_another_replica_when_the_first_never_took_the_request(make_app, fake_upstreams, failure, caplog):
    broken, good = fake_upstreams(2)
    broken_url = unused_port_url() if failure == "refused" else broken.url_for("")
    broken.expect_request(CHAT).respond_with_json({"error": {"message": "no"}},
                                                  status=failure if failure != "refused" else 500)
    good.expect_request(CHAT).respond_with_json(CHAT_ANSWER)
    app = routed_app(make_app, {"chat": [broken_url, good.url_for("")]})
    client = app.test_client()
    with caplog.at_level(logging.INFO, logger="service.access"):
        response = chat(client)
        response.close()  # the log line is written when the body has been sent
    assert response.status_code == 200 and response.get_json()["model"] == "chat"
    fields = next(record.fields for record in caplog.records if record.name == "service.access")
    assert fields["replica"] == good.url_for("").rstrip("/") and fields["model"] == "chat" and fields["retries"] == 1
    samples = replica_samples(app)
    assert samples[("gateway_replica_failures_total", "chat", broken_url.rstrip("/"))] == 1
    assert samples[("gateway_replica_requests_total", "chat", good.url_for("").rstrip("/"))] == 1


@pytest.mark.parametrize("status", [500, 400])
def test_an_answer_that_is_not_a_refusal_is_final(make_app, fake_upstreams, status):
    first, second = fake_upstreams(2)
    for up in (first, second):
        up.expect_request(CHAT).respond_with_json({"error": {"message": "bad", "type": "x"}}, status=status)
    client = routed_app(make_app, {"chat": [first.url_for(""), second.url_for("")]}).test_client()
    response = chat(client)
    assert response.status_code == (502 if status == 500 else 400)
    assert len(first.log) + len(second.log) == 1


def test_every_request_succeeds_while_a_replica_is_dead_and_it_is_ejected(make_app, fake_upstreams):
    good, = fake_upstreams(1)
    good.expect_request(CHAT).respond_with_json(CHAT_ANSWER)
    good.expect_request("/health").respond_with_json({"status": "ok"})
    dead = unused_port_url()
    app = routed_app(make_app, {"chat": [dead, good.url_for("")]}, REPLICA_EJECT_AFTER="2",
                     REPLICA_COOLDOWN_S="60")
    client = app.test_client()
    for turn in range(10):
        # Each a new prompt: a repeated one would go back to the replica that answered it (cache-aware).
        with chat(client, messages=[{"role": "user", "content": f"hi {turn}"}]) as response:
            assert response.status_code == 200  # closing it ends the request, as waitress does
    samples = replica_samples(app)
    assert samples[("gateway_replica_failures_total", "chat", dead)] == 2  # then it was out of rotation
    assert samples[("gateway_replica_ejections_total", "chat", dead)] == 1
    assert samples[("gateway_replica_up", "chat", dead)] == 0
    assert samples[("gateway_replica_in_flight_requests", "chat", good.url_for("").rstrip("/"))] == 0
    health = client.get("/health").get_json()
    assert health["status"] == "degraded"
    dead_report, good_report = health["models"]["chat"]["replicas"]
    assert dead_report["ejected"] and dead_report["status"] == "unreachable" and not good_report["ejected"]


def test_a_stream_is_never_retried_once_it_began(make_app, fake_upstreams):
    from tests.fakes import SSE_HEAD, BrokenPeer, chunk

    def break_mid_stream(peer, conn):
        conn.sendall(SSE_HEAD + chunk(b'data: {"choices":[],"model":"m"}\n\n'))
        conn.close()

    peer = BrokenPeer(break_mid_stream)
    spare, = fake_upstreams(1)
    client = routed_app(make_app, {"chat": [peer.url, spare.url_for("")]}).test_client()
    text = chat(client, stream=True).get_data(as_text=True)
    assert '"model":"chat"' in text and '"error"' in text.splitlines()[-2]
    assert not spare.log


def test_model_upstreams_and_llama_server_url_exclude_each_other():
    with pytest.raises(ConfigError, match="MODEL_UPSTREAMS"):
        load_settings({"MODEL_UPSTREAMS": "a=http://h:1", "LLAMA_SERVER_URL": "http://h:2"})
