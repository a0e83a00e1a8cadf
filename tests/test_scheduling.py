"""Scheduling with real llama.cpp: a burst from one client does not starve another (SCHEDULER=fair, and fifo for
contrast), a queue timeout, a client leaving while queued, weights, the per-client queue cap, a waiting stream's
SSE comments, and conversations going back to the replica that has them cached."""
import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests

from service.llama.supervisor import LlamaSupervisor
from service.proxy import relay
from tests.apps import routed_app
from tests.metrics_helpers import scrape, value
from tests.processes import llama_metric, start_llama, wait_processing

pytestmark = pytest.mark.llama

# Two clients, so that the scheduler has someone to be fair to.
KEYS = {"OPENAI_API_KEYS": "ka:team_a,kb:team_b"}
A, B = {"Authorization": "Bearer ka"}, {"Authorization": "Bearer kb"}
# Enough waitress threads for every request a test has open at once (each waiting request holds one), so that the
# gateway's queues, not waitress's own first-come queue, decide the order.
THREADS = 24
# A generation that only max_tokens ends (the demo model's slots hold 1024 tokens).
BURST_REQUEST = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True}
# A stream that holds a slot of the slow model until the test closes it (2000 tokens take many seconds there).
HOLD = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
SHORT = {"prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True}


@pytest.fixture(scope="module")
def slow(slow_model_path):
    """A real llama.cpp with 2 slots on the slow model: a stream there lasts until the test cuts it."""
    supervisor = LlamaSupervisor(slow_model_path, ctx=4096, parallel=2, threads=1, embeddings=False,
                                 startup_timeout=60).start()
    yield supervisor
    supervisor.stop()


@pytest.fixture(scope="module")
def llama(demo_model_path):
    """A llama.cpp of this module's own: the burst counts its slots' requests, which no other module's leftover
    generation may take (the session's llama is shared by every module a test worker runs)."""
    supervisor = LlamaSupervisor(demo_model_path, ctx=2048, parallel=2, threads=1, embeddings=True,
                                 startup_timeout=60).start()
    yield supervisor
    supervisor.stop()


@pytest.fixture
def gateway(make_app, live_gateway):
    """start(upstream_url or routes dict, **settings) -> (app, base URL): the gateway with two clients' keys."""

    def start(upstream, **settings):
        settings = {**KEYS, "WAITRESS_THREADS": str(THREADS), **settings}  # (it sizes the upstream pool too)
        app = routed_app(make_app, upstream, **settings) if isinstance(upstream, dict) else make_app(upstream,
                                                                                                        **settings)
        return app, live_gateway(app, threads=THREADS)

    return start


def wait_until(condition, timeout=10, what="the condition"):
    """Poll condition until it holds; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} never held"
        time.sleep(0.01)


def depth(app) -> float:
    """gateway_queue_depth, summed over models."""
    return value(scrape(app.test_client()), "gateway_queue_depth")


class Holders:
    """Streams that take every slot of a llama.cpp until closed (client A's): its slots are full meanwhile."""

    def __init__(self, base, llama, count=2, model=None):
        self.llama = llama
        parts = urlsplit(base)
        body = json.dumps({**HOLD, "model": model} if model else HOLD)
        self.connections = []
        for _ in range(count):
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            connection.request("POST", "/v1/completions", body=body,
                               headers={"Content-Type": "application/json", **A})
            response = connection.getresponse()
            assert response.status == 200 and response.read1(65536).startswith(b"data: ")  # generating
            self.connections.append((connection, response))  # the response too: collected, it would close
        wait_processing(llama, count, timeout=10)

    def close(self):
        """Let go of the slots: llama.cpp stops generating within about a second."""
        for connection, response in self.connections:
            response.close()
            connection.close()
        self.connections = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        wait_processing(self.llama, 0, timeout=15)  # the next test finds the slots free


def post_in_thread(url, body, headers, results, key, request_id=None):
    """POST from a thread; results[key] = (status, monotonic time of the answer, json)."""

    def run():
        extra = {"x-request-id": request_id} if request_id else {}
        response = requests.post(url, json=body, headers={**headers, **extra}, timeout=60)
        results[key] = (response.status_code, time.monotonic(), response.json())

    thread = threading.Thread(target=run, name=f"client-{key}")
    thread.start()
    return thread


def burst(app, base, llama, scheduler):
    """Client A sends 10 generations at once; once all of them are in, B sends one. Return (B's latency, A's
    latencies sorted, how many of A's finished before B), in seconds."""
    url = base + "/v1/completions"
    results, started = {}, time.monotonic()
    threads = [post_in_thread(url, BURST_REQUEST, A, results, f"a{i}") for i in range(10)]
    # All of A's are in: both slots busy, the 8 others queued in the gateway (fair) or deferred by llama.cpp (fifo).
    if scheduler == "fair":
        wait_until(lambda: depth(app) == 8 and llama_metric(llama, "llamacpp:requests_processing") == 2,
                   timeout=30, what="2 of A's requests generating and 8 queued in the gateway")  # a busy box: slow
    else:
        wait_until(lambda: llama_metric(llama, "llamacpp:requests_deferred") == 8,
                   what="8 of A's requests deferred by llama.cpp")
    b_sent = time.monotonic()
    threads.append(post_in_thread(url, BURST_REQUEST, B, results, "b"))
    for thread in threads:
        thread.join(60)
    assert {status for status, _, _ in results.values()} == {200}, results
    b_done = results.pop("b")[1]
    a_done = sorted(done for _, done, _ in results.values())
    return b_done - b_sent, [done - started for done in a_done], sum(done < b_done for done in a_done)


def test_a_burst_from_one_client_does_not_starve_another(gateway, llama):
    app, base = gateway(llama.url, SCHEDULER="fair")
    b_latency, a_latencies, a_before_b = burst(app, base, llama, "fair")
    # B's turn comes right after A's next one: at most 2 of A's finish before B starts, 2 more while it runs.
    measured = (f"B {b_latency:.2f} s; A's first {a_latencies[0]:.2f} s, median {a_latencies[4]:.2f} s, "
                f"last {a_latencies[-1]:.2f} s")
    assert a_before_b <= 4, f"{a_before_b} of A's 10 finished before B ({measured})"
    assert b_latency < a_latencies[4], measured
    print(f"fair: {measured}")


def test_with_fifo_the_burst_goes_first(gateway, llama):
    app, base = gateway(llama.url, SCHEDULER="fifo")
    b_latency, a_latencies, a_before_b = burst(app, base, llama, "fifo")
    measured = (f"B {b_latency:.2f} s; A's first {a_latencies[0]:.2f} s, median {a_latencies[4]:.2f} s, "
                f"last {a_latencies[-1]:.2f} s")
    assert a_before_b >= 8, f"only {a_before_b} of A's 10 finished before B ({measured})"
    assert b_latency > a_latencies[4], measured
    print(f"fifo: {measured}")


def test_a_request_that_waits_too_long_gets_503_queue_timeout_in_its_familys_envelope(gateway, slow):
    app, base = gateway(slow.url, QUEUE_TIMEOUT_S="0.5")
    with Holders(base, slow):
        started = time.monotonic()
        response = requests.post(base + "/v1/chat/completions", headers=B, timeout=30,
                                 json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        waited = time.monotonic() - started
        assert response.status_code == 503 and response.headers["Retry-After"]
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "queue_timeout"
        assert "QUEUE_TIMEOUT_S" in error["message"]
        assert 0.5 <= waited < 5
        anthropic = requests.post(base + "/v1/messages", timeout=30,
                                  headers={"x-api-key": "kb", "anthropic-version": "2023-06-01"},
                                  json={"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        # Anthropic's own status for "overloaded, try later", in its envelope.
        assert anthropic.status_code == 529 and anthropic.headers["Retry-After"]
        body = anthropic.json()
        assert set(body) == {"type", "error"} and body["type"] == "error"
        assert body["error"]["type"] == "overloaded_error" and "QUEUE_TIMEOUT_S" in body["error"]["message"]
        assert depth(app) == 0  # both left the queue
        assert llama_metric(slow, "llamacpp:requests_deferred") == 0  # neither ever reached llama.cpp


def test_a_client_that_leaves_while_queued_is_dropped_at_once_and_never_reaches_llama(gateway, slow, access_log):
    app, base = gateway(slow.url)
    parts = urlsplit(base)
    with Holders(base, slow):
        prompt_tokens = llama_metric(slow, "llamacpp:prompt_tokens_total")  # the holders' prompts are counted
        payload = json.dumps({"prompt": "A prompt nobody has sent before, long enough to count. " * 4,
                              "max_tokens": 50}).encode()
        client = socket.create_connection((parts.hostname, parts.port), timeout=5)
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer kb\r\nx-request-id: leaver\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        wait_until(lambda: depth(app) == 1, what="the request queued")
        client.close()
        left = time.monotonic()
        wait_until(lambda: depth(app) == 0, timeout=3, what="the queue dropping the client that left")
        dropped_after = time.monotonic() - left
        line = access_log.line("leaver")
        assert line["status"] == 499 and line["error"] == "client_closed_request"
        assert "queue_ms" not in line and "replica" not in line  # it never had a slot, nor an upstream call
    # The slots are free again and llama.cpp is idle: it never processed the leaver's prompt.
    assert llama_metric(slow, "llamacpp:prompt_tokens_total") == prompt_tokens
    assert dropped_after < 1.5


def test_a_client_with_weight_3_gets_3_turns_per_turn_of_another(gateway, slow, access_log):
    # One slot (MODEL_SETTINGS chat:slots=1): the order the requests finish in is the order of their turns.
    app, base = gateway({"chat": [slow.url]}, RATE_LIMITS="team_a:weight=3", MODEL_SETTINGS="chat:slots=1")
    url, results, threads = base + "/v1/completions", {}, []
    body = {**SHORT, "model": "chat"}
    with Holders(base, slow, count=1, model="chat") as holder:
        for i in range(9):
            threads.append(post_in_thread(url, body, A, results, f"a{i}", request_id=f"turn-a{i}"))
        wait_until(lambda: depth(app) == 9, what="A's requests queued")
        for i in range(3):
            threads.append(post_in_thread(url, body, B, results, f"b{i}", request_id=f"turn-b{i}"))
        wait_until(lambda: depth(app) == 12, what="B's requests queued")
        holder.close()
        for thread in threads:
            thread.join(60)
    assert {status for status, _, _ in results.values()} == {200}
    for name in results:
        access_log.line(f"turn-{name}")  # written once its answer was sent
    lines = [line for line in access_log.lines if line["request_id"].startswith("turn-")]
    assert "".join(line["client_id"][-1] for line in lines) == "aaabaaabaaab"
    assert all(line["queue_ms"] > 0 for line in lines)  # each waited for its turn, and its line says how long
    waits = value(scrape(app.test_client()), "gateway_queue_wait_seconds_count", model="chat")
    assert waits == 13  # the holder's (no wait) and the 12 turns


def test_beyond_queue_max_per_client_429_queue_full_at_once(gateway, slow):
    app, base = gateway(slow.url, QUEUE_MAX_PER_CLIENT="1")
    url, results = base + "/v1/completions", {}
    with Holders(base, slow):
        queued = [post_in_thread(url, SHORT, A, results, "a")]
        wait_until(lambda: depth(app) == 1, what="A's request queued")
        started = time.monotonic()
        refused = requests.post(url, json=SHORT, headers=A, timeout=30)
        assert time.monotonic() - started < 2  # at once, not once a slot frees (the holders hold them for long)
        assert refused.status_code == 429 and refused.headers["Retry-After"]
        error = refused.json()["error"]
        assert error["code"] == "queue_full" and "QUEUE_MAX_PER_CLIENT" in error["message"]
        queued.append(post_in_thread(url, SHORT, B, results, "b"))  # another client still queues
        wait_until(lambda: depth(app) == 2, what="B's request queued")
    for thread in queued:
        thread.join(60)
    assert results["a"][0] == results["b"][0] == 200


def test_a_stream_that_waits_for_a_slot_gets_sse_comments_then_its_events(gateway, slow, monkeypatch):
    monkeypatch.setattr(relay, "WAIT_KEEPALIVE_S", 0.05)
    app, base = gateway(slow.url)
    parts = urlsplit(base)
    with Holders(base, slow) as holders:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        connection.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json", **B},
                           body=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                            "stream": True}))
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
        first = response.read1(65536)
        assert first.startswith(relay.WAITING_COMMENT)
        assert depth(app) == 1  # it still waits, holding no slot
        holders.close()
        rest = response.read()
        connection.close()
    events = (first + rest).replace(relay.WAITING_COMMENT, b"")
    assert events.startswith(b"data: {") and events.rstrip().endswith(b"data: [DONE]")


# Each conversation's own system prompt (about 100 tokens): a replica that has not seen it has nothing cached.
SYSTEMS = [f"{topic} You answer in one short sentence, and you never repeat the question back."
           for topic in ("Zebras are your only topic.", "Quantum tea is what you know.", "Old maps fascinate you.")]


def test_each_conversation_goes_back_to_the_replica_that_has_it_cached(gateway, demo_model_path, access_log):
    replicas = [start_llama(demo_model_path), start_llama(demo_model_path)]
    try:
        app, base = gateway({"chat": [replica.url for replica in replicas]})
        conversations = [[{"role": "system", "content": system}] for system in SYSTEMS]
        for turn in range(3):
            for number, messages in enumerate(conversations):
                messages.append({"role": "user", "content": f"Question {turn} of conversation {number}?"})
                answer = requests.post(base + "/v1/chat/completions", timeout=30,
                                       headers={**A, "x-request-id": f"c{number}-t{turn}"},
                                       json={"model": "chat", "messages": messages, "max_tokens": 8,
                                             "temperature": 0}).json()
                usage = answer["usage"]
                cached = usage["prompt_tokens_details"]["cached_tokens"]  # llama.cpp says what it reused
                if turn:
                    assert cached > usage["prompt_tokens"] / 2, (turn, number, usage)
                messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        # Each request's log line (written once its answer was sent, after its metrics) says where it went.
        for number in range(len(conversations)):
            lines = [access_log.line(f"c{number}-t{turn}") for turn in range(3)]
            assert [line["affinity"] for line in lines] == ["miss", "hit", "hit"]
            assert len({line["replica"] for line in lines}) == 1
        samples = scrape(app.test_client())
        assert value(samples, "gateway_cache_affinity_total", result="hit") == 6
        assert value(samples, "gateway_cache_affinity_total", result="miss") == 3
        served = sorted(value(samples, "gateway_replica_requests_total", replica=replica.url) for replica in replicas)
        assert served == [3, 6]  # each conversation stayed where it began: two on one replica, one on the other
    finally:
        for replica in replicas:
            replica.stop()
