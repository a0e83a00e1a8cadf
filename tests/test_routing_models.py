"""Routes built from model specs (issue 21): a model's aliases reach its replicas, its request rules (defaults, a
max-tokens ceiling, strips) reach llama.cpp for every API family, /v1/models shows aliases and capabilities, and
the routes change while requests run (Router.apply)."""
import json
import threading
import time
from types import SimpleNamespace

import pytest
import requests
from flask import g
from werkzeug import Response

from service import create_app
from service.llama.pooled_model import ModelRemoved
from service.models.spec import Limits, ModelSet, ModelSpec, frozen_defaults
from service.operations.request_log import RequestRecord
from service.proxy.admission import admit
from service.proxy.routing import Router
from service.proxy.upstream import Upstream
from tests.apps import FAST_SETTINGS
from tests.clients import ANTHROPIC_VERSION, CHAT, assert_openai_envelope, chat
from tests.fakes import CHAT_ANSWER, gated_stream

DEFAULTS = frozen_defaults({"temperature": 0.7, "top_k": 40, "chat_template_kwargs": {"enable_thinking": False}})
RULES = {"defaults": DEFAULTS, "limits": Limits(max_tokens=16, strip=("logit_bias",))}


def base(server) -> str:
    """A pytest-httpserver's base URL, as a models file writes it."""
    return server.url_for("").rstrip("/")


def posted(server, path=CHAT) -> list:
    """The bodies a fake upstream was sent to path, in order (the scheduler also asks it GET /props)."""
    return [request.get_data() for request, _ in server.log if request.path == path]


def received(server, path=CHAT) -> dict:
    """The last JSON body a fake upstream was sent to path."""
    return json.loads(posted(server, path)[-1])


@pytest.fixture
def models_app():
    """build(*specs, local_urls=None, any_name=False, **settings): an app routing a ModelSet, as bin/serve builds
    one from a models file."""
    apps = []

    def build(*specs, local_urls=None, any_name=False, **settings):
        app = create_app({**FAST_SETTINGS, "TESTING": True, **settings},
                         models=ModelSet(tuple(specs), any_name=any_name), local_urls=local_urls)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["upstream"].close()


def test_every_alias_is_the_same_route_to_the_models_upstreams_and_its_local_llama():
    specs = (ModelSpec("qwen", upstreams=("http://h1:8080",), aliases=("gpt-4o-mini", "qwen-chat"), **RULES),
             ModelSpec("plain", source="/m/plain.gguf"))
    router = Router.from_models(ModelSet(specs), {"qwen": "http://127.0.0.1:9001", "plain": "http://127.0.0.1:9002"})
    qwen = router.route("qwen")
    assert router.route("gpt-4o-mini") is qwen and router.route("qwen-chat") is qwen
    assert [replica.url for replica in qwen.replicas] == ["http://h1:8080", "http://127.0.0.1:9001"]
    assert qwen.spec is specs[0] and qwen.rules.max_tokens == 16 and qwen.rules.strip == ("logit_bias",)
    plain = router.route("plain")
    assert plain.rules is None  # a model without rules pays nothing on the request path
    assert [replica.url for replica in plain.replicas] == ["http://127.0.0.1:9002"]
    assert list(router.routes) == ["qwen", "plain"]  # each model once: aliases are names, not models
    assert router.fallback is None


def test_a_model_of_any_name_is_the_fallback_and_keeps_its_rules():
    spec = ModelSpec("demo", source="/m/demo.gguf", **RULES)
    router = Router.from_models(ModelSet((spec,), any_name=True), {"demo": "http://127.0.0.1:9001"})
    assert router.routes == {} and router.fallback.name is None
    assert router.route("anything") is router.fallback and router.route(None) is router.fallback
    assert router.fallback.rules.max_tokens == 16


def test_an_alias_reaches_its_model_and_is_named_back_and_an_unknown_name_is_404(models_app, fake_upstreams):
    qwen_up, other_up = fake_upstreams(2)
    qwen_up.expect_request(CHAT).respond_with_json(CHAT_ANSWER)
    client = models_app(ModelSpec("qwen", upstreams=(base(qwen_up),), aliases=("gpt-4o-mini",)),
                        ModelSpec("other", upstreams=(base(other_up),))).test_client()
    answer = chat(client, model="gpt-4o-mini")
    assert answer.status_code == 200 and answer.get_json()["model"] == "gpt-4o-mini"  # as the client named it
    assert chat(client, model="qwen").get_json()["model"] == "qwen"
    assert len(posted(qwen_up)) == 2 and not other_up.log
    error = assert_openai_envelope(chat(client, model="qwen-chat"), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_a_stream_under_an_alias_names_the_alias_in_every_chunk(models_app, fake_upstreams):
    up, = fake_upstreams(1)
    chunk = b'data: {"choices":[{"delta":{"content":"a"}}],"model":"f.gguf"}\n\n'
    up.expect_request(CHAT).respond_with_response(Response(chunk * 2 + b"data: [DONE]\n\n",
                                                           content_type="text/event-stream"))
    client = models_app(ModelSpec("qwen", upstreams=(base(up),), aliases=("gpt-4o-mini",))).test_client()
    text = chat(client, model="gpt-4o-mini", stream=True, stream_options={"include_usage": True}).get_data()
    assert text == chunk.replace(b"f.gguf", b"gpt-4o-mini") * 2 + b"data: [DONE]\n\n"


# Per API family: llama-server's path, a request asking for 100 tokens in its own field, with a value of its own
# for a field that has a default (top_k), and a field the model strips.
FAMILIES = [
    ("/v1/chat/completions", "max_tokens", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", "max_tokens", {"prompt": "hi"}),
    ("/v1/responses", "max_output_tokens", {"input": "hi"}),
    ("/v1/messages", "max_tokens", {"messages": [{"role": "user", "content": "hi"}]}),
]


@pytest.mark.parametrize("path, limit, fields", FAMILIES, ids=[family[0] for family in FAMILIES])
def test_rules_reach_llama_cpp_in_every_family(models_app, fake_upstreams, access_log, path, limit, fields):
    up, = fake_upstreams(1)
    up.expect_request(path).respond_with_json({"model": "f.gguf"})
    client = models_app(ModelSpec("qwen", upstreams=(base(up),), **RULES)).test_client()
    sent = {"model": "qwen", **fields, limit: 100, "top_k": 5, "logit_bias": {"42": 1}}
    response = client.post(path, json=sent, headers={**ANTHROPIC_VERSION, "x-request-id": "rules-1"})
    assert response.status_code == 200, response.get_data()
    response.close()
    body = received(up, path)
    assert body["temperature"] == 0.7 and body["chat_template_kwargs"] == {"enable_thinking": False}  # defaults
    assert body["top_k"] == 5  # the client's own value wins over the default
    assert body[limit] == 16  # lowered to the ceiling, never refused
    assert "logit_bias" not in body  # stripped
    assert {key: body[key] for key in fields} == fields and body["model"] == "qwen"  # the rest as sent
    assert access_log.line("rules-1")["max_tokens_lowered_from"] == 100


def test_a_request_within_the_ceiling_is_logged_without_a_lowering(models_app, fake_upstreams, access_log):
    up, = fake_upstreams(1)
    up.expect_request(CHAT).respond_with_json(CHAT_ANSWER)
    client = models_app(ModelSpec("qwen", upstreams=(base(up),), **RULES)).test_client()
    response = chat(client, model="qwen", max_tokens=8)
    response.close()
    assert received(up)["max_tokens"] == 8
    assert "max_tokens_lowered_from" not in access_log.wait(1)[0]


def test_a_stream_is_sent_with_its_rules_and_the_usage_the_gateway_asks_for(models_app, fake_upstreams):
    up, = fake_upstreams(1)
    up.expect_request(CHAT).respond_with_response(Response(b"data: [DONE]\n\n", content_type="text/event-stream"))
    client = models_app(ModelSpec("qwen", upstreams=(base(up),), **RULES)).test_client()
    chat(client, model="qwen", stream=True, max_tokens=500).get_data()
    body = received(up)
    assert body["temperature"] == 0.7 and body["max_tokens"] == 16
    assert body["stream_options"] == {"include_usage": True}  # asked on the rewritten body, not the client's


def test_a_model_without_rules_forwards_the_clients_bytes_unchanged(models_app, fake_upstreams):
    up, = fake_upstreams(1)
    up.expect_request(CHAT).respond_with_json(CHAT_ANSWER)
    client = models_app(ModelSpec("plain", upstreams=(base(up),), aliases=("p",)),
                        ModelSpec("ruled", upstreams=(base(up),), **RULES)).test_client()
    raw = b'{ "model" : "p",\n  "messages": [{"role": "user", "content": "caf\\u00e9"}], "logit_bias": {} }'
    response = client.post(CHAT, data=raw, content_type="application/json")
    assert response.status_code == 200
    assert posted(up) == [raw]


def test_models_list_their_aliases_and_capabilities_once_each(models_app, fake_upstreams):
    vision_up, plain_up = fake_upstreams(2)
    for up in (vision_up, plain_up):
        up.expect_request("/v1/models").respond_with_json({"object": "list", "data": [{"id": "f.gguf"}]})
    client = models_app(
        ModelSpec("gemma", source="/m/gemma.gguf", mmproj="/m/mmproj-gemma.gguf", upstreams=(base(vision_up),),
                  aliases=("gpt-4o", "vision")),
        ModelSpec("plain", source="hf:o/text-only", upstreams=(base(plain_up),), mmproj="auto")).test_client()
    # gemma's llama.cpp was given the projector the fleet found (--mmproj); plain asked for one ("auto"), but its
    # repo has none: it takes no images, whatever its spec asked.
    eye = SimpleNamespace(status="loaded", supervisor=SimpleNamespace(args=("-fa", "on", "--mmproj", "/m/p.gguf")))
    text = SimpleNamespace(status="loaded", supervisor=SimpleNamespace(args=("-fa", "on")))
    client.application.extensions["model_pool"] = SimpleNamespace(
        model_for=lambda route: eye if route.name == "gemma" else text)
    listed = client.get("/v1/models").get_json()["data"]
    assert [entry["id"] for entry in listed] == ["gemma", "plain"]
    gemma, plain = listed
    assert gemma["aliases"] == ["gpt-4o", "vision"] and gemma["capabilities"] == ["vision"]
    assert "aliases" not in plain and "capabilities" not in plain
    by_alias = client.get("/v1/models/vision")
    assert by_alias.status_code == 200 and by_alias.get_json()["id"] == "gemma"
    assert by_alias.get_json()["capabilities"] == ["vision"]
    assert client.get("/v1/models/nope").status_code == 404


def test_a_removed_model_takes_no_new_request_while_its_stream_in_flight_ends(models_app, fake_upstreams,
                                                                             live_gateway):
    kept_up, removed_up, added_up = fake_upstreams(3)
    release = threading.Event()
    removed_up.expect_request(CHAT).respond_with_handler(gated_stream(
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n', b"data: [DONE]\n\n", release))
    added_up.expect_request(CHAT).respond_with_json(CHAT_ANSWER)
    kept = ModelSpec("kept", upstreams=(base(kept_up),))
    app = models_app(kept, ModelSpec("gone", upstreams=(base(removed_up),), aliases=("old",)))
    url = live_gateway(app)
    stream = requests.post(url + CHAT, json={"model": "gone", "stream": True, "messages": [
        {"role": "user", "content": "hi"}]}, stream=True, timeout=10)
    chunks = stream.iter_content(None)
    try:
        assert b"content" in next(chunks)  # under way when the routes change
        changes = app.extensions["router"].apply(
            ModelSet((kept, ModelSpec("new", upstreams=(base(added_up),)))))
        assert (changes.added, changes.removed, changes.updated) == (("new",), ("gone",), ())
        for name in ("gone", "old"):
            late = requests.post(url + CHAT, json={"model": name, "messages": [{"role": "user", "content": "hi"}]},
                                 timeout=10)
            assert late.status_code == 404 and late.json()["error"]["code"] == "model_not_found"
        added = requests.post(url + CHAT, json={"model": "new", "messages": [{"role": "user", "content": "hi"}]},
                              timeout=10)
        assert added.status_code == 200 and added.json()["model"] == "new"
    finally:
        release.set()
    assert b"".join(chunks).endswith(b"data: [DONE]\n\n")  # the one in flight finished
    stream.close()
    assert len(posted(removed_up)) == 1 and len(posted(added_up)) == 1
    assert app.extensions["upstream"].retries[base(added_up)] == app.config["UPSTREAM_RETRIES"]


def test_a_live_update_keeps_the_route_and_changes_its_names_rules_and_replicas(models_app, fake_upstreams):
    first_up, moved_up = fake_upstreams(2)
    for up in (first_up, moved_up):
        up.expect_request(CHAT).respond_with_json(CHAT_ANSWER)
    app = models_app(ModelSpec("qwen", upstreams=(base(first_up),), aliases=("old",)))
    client, router = app.test_client(), app.extensions["router"]
    route = router.route("qwen")
    changes = router.apply(ModelSet((ModelSpec("qwen", upstreams=(base(moved_up),), aliases=("new",), **RULES),)))
    assert changes.updated == ("qwen",) and not changes.added and not changes.removed
    assert router.route("new") is route and route.rules.max_tokens == 16
    assert chat(client, model="old").status_code == 404
    assert chat(client, model="new", max_tokens=99).get_json()["model"] == "new"
    assert not first_up.log and received(moved_up)["max_tokens"] == 16
    assert router.apply(router.models) == ((), (), ())  # the same set again changes nothing


def test_a_switch_between_any_name_and_own_names_is_an_update_and_only_a_removed_model_s_route_is_marked():
    a, b = ModelSpec("a", upstreams=("http://127.0.0.1:9001",)), ModelSpec("b", upstreams=("http://127.0.0.1:9002",))
    router = Router.from_models(ModelSet((a,), any_name=True))
    fallback = router.fallback
    assert router.apply(ModelSet((a, b))) == (("b",), (), ("a",))  # a: the same model, now under its own names
    assert not fallback.removed, "a request that found a's route must still be served: a stays"
    named_b = router.route("b")
    assert router.apply(ModelSet((a,), any_name=True)) == ((), ("b",), ("a",))
    assert named_b.removed and not router.fallback.removed  # b's request that found its route gets a 404


def test_a_request_that_found_a_removed_route_is_refused_with_404_before_it_is_sent(models_app):
    a, b = (ModelSpec(name, upstreams=("http://127.0.0.1:9",)) for name in ("a", "b"))
    app = models_app(a, b)  # no pool: llama-servers run elsewhere
    router = app.extensions["router"]
    found = router.route("b")
    router.apply(ModelSet((a,)))
    with app.test_request_context():
        g.record = RequestRecord("r", "POST", CHAT, time.perf_counter())
        with pytest.raises(ModelRemoved) as removed:
            admit(found)  # else sent to a llama-server that no longer serves it under that name
    assert removed.value.status == 404 and "'b'" in removed.value.message


def test_add_target_mounts_a_new_replica_once_with_its_retries():
    upstream = Upstream({"http://127.0.0.1:9001": 2}, timeouts={"chat": (1, 1)})
    try:
        upstream.add_target("http://127.0.0.1:9002", 3)
        adapter = upstream.session.get_adapter("http://127.0.0.1:9002/v1/chat/completions")
        assert adapter.max_retries.total == 3
        assert upstream.session.get_adapter("http://127.0.0.1:9002/health").max_retries.total == 0
        upstream.add_target("http://127.0.0.1:9002", 3)  # the same again: nothing to do
        assert upstream.session.get_adapter("http://127.0.0.1:9002/v1/chat/completions") is adapter
        upstream.add_target("http://127.0.0.1:9002", 0)  # a second replica joined its model: no retries now
        assert upstream.session.get_adapter("http://127.0.0.1:9002/v1/chat/completions").max_retries.total == 0
        assert upstream.session.get_adapter("http://127.0.0.1:9001/v1/chat/completions").max_retries.total == 2
    finally:
        upstream.close()


def test_placement_reads_the_body_the_rules_made(models_app, fake_upstreams, access_log):
    # A default system prompt makes a request without one begin as one that sent it: the same cached prefix.
    first, second = fake_upstreams(2)
    answer = {"type": "message", "model": "f.gguf", "content": [], "usage": {"input_tokens": 1, "output_tokens": 1}}
    for up in (first, second):
        up.expect_request("/v1/messages").respond_with_json(answer)
    client = models_app(ModelSpec("claude", upstreams=(base(first), base(second)),
                                  defaults=frozen_defaults({"system": "Be brief."}))).test_client()
    turn = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    for number, body in enumerate(({**turn, "system": "Be brief."}, turn)):
        client.post("/v1/messages", json=body, headers={**ANTHROPIC_VERSION, "x-request-id": f"a{number}"}).close()
    assert access_log.line("a0")["affinity"] == "miss" and access_log.line("a1")["affinity"] == "hit"
    assert access_log.line("a0")["replica"] == access_log.line("a1")["replica"]
