"""Routing over real llama.cpp servers: two models by name through the openai SDK, and replicas of one model
with one killed mid-run, through waitress."""
import time

import openai
import pytest
import requests

from tests.apps import routed_app
from tests.clients import HI
from tests.processes import start_llama

pytestmark = pytest.mark.llama


def metric(base, name, **labels) -> float:
    """One sample's value from the gateway's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(base + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


def test_the_sdk_switches_models_between_requests(make_app, live_gateway, llama, other_llama):
    base = live_gateway(routed_app(make_app, {"small": [llama.url], "smaller": [other_llama.url]}))
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30)
    for model in ("small", "smaller", "small"):
        answer = client.chat.completions.create(model=model, messages=HI, max_tokens=2)
        assert answer.model == model
    chunks = list(client.chat.completions.create(model="smaller", messages=HI, max_tokens=3, stream=True))
    assert chunks and {chunk.model for chunk in chunks} == {"smaller"}
    widths = {model: len(client.embeddings.create(model=model, input="hi").data[0].embedding)
              for model in ("small", "smaller")}
    assert widths == {"small": 64, "smaller": 32}  # each model's own llama.cpp answered
    assert metric(base, "gateway_replica_requests_total", model="small", replica=llama.url) == 3
    assert metric(base, "gateway_replica_requests_total", model="smaller", replica=other_llama.url) == 3


def test_a_replica_killed_mid_run_costs_no_request_and_comes_back(make_app, live_gateway, llama,
                                                                   demo_model_path):
    victim = start_llama(demo_model_path)
    try:
        app = routed_app(make_app, {"chat": [llama.url, victim.url]}, REPLICA_EJECT_AFTER="1",
                         REPLICA_COOLDOWN_S="1", HEALTH_CACHE_S="0")
        base = live_gateway(app)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30)

        sent = []

        def run(n):
            for _ in range(n):
                sent.append(f"hi {len(sent)}")  # a new prompt each: a repeated one would go back where it was cached
                messages = [{"role": "user", "content": sent[-1]}]
                assert client.chat.completions.create(model="chat", messages=messages, max_tokens=2).model == "chat"

        run(6)
        assert metric(base, "gateway_replica_requests_total", replica=victim.url) == 3  # least busy, in turn
        victim.process.kill()
        victim.process.wait()
        run(6)  # every one served, by the replica that is left
        health = requests.get(base + "/health", timeout=10).json()
        assert health["status"] == "degraded"
        assert health["models"]["chat"]["replicas"][1]["ejected"] is True
        assert metric(base, "gateway_replica_up", replica=victim.url) == 0
        assert metric(base, "gateway_replica_ejections_total", replica=victim.url) == 1
        # The supervisor restarts it; once its /health answers again and the cooldown is over, it is back.
        deadline = time.monotonic() + 30
        while requests.get(base + "/health", timeout=10).json()["status"] != "ok":
            assert time.monotonic() < deadline, "the replica never came back"
            time.sleep(0.2)
        assert metric(base, "gateway_replica_up", replica=victim.url) == 1
        served = metric(base, "gateway_replica_requests_total", replica=victim.url)
        run(4)
        assert metric(base, "gateway_replica_requests_total", replica=victim.url) == served + 2
    finally:
        victim.stop()
