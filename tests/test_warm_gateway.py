"""Warm conversations through the gateway (issue 22) with real llama.cpp: two demo-model copies, one loaded at a
time, so that a request to "b" unloads "a" (its long slots saved first) and the conversation's next turn on "a"
loads it again with its prompt restored from disk, not computed. One gateway for the module; each test its own
conversation, and counters read as differences."""
import json
import os
import threading

import pytest
import requests
from werkzeug import Response

from service.warm.prefix import prefix_keys
from tests.warm_helpers import (Gateway, answer_of, cached_tokens, conversation, late_load_listeners, model_copies,
                                next_turn)

pytestmark = pytest.mark.llama
RESTORES = "gateway_kv_restores_total"


@pytest.fixture(scope="module")
def gateway(demo_model_path, tmp_path_factory, make_httpserver):
    """The gateway over "a" and "b" (run here, warm) and "far" (pytest-httpserver: a model run elsewhere)."""
    folder = tmp_path_factory.mktemp("warm")
    running = Gateway(model_copies(demo_model_path, str(folder / "models")), folder / "kv",
                      upstreams={"far": make_httpserver.url_for("").rstrip("/")})
    # Saved here only before an unload (the saver's save of an idle slot would race it): a state on disk was saved
    # by the unload.
    running.warm.conversations.saver.idle_s = 3600.0
    yield running
    running.stop()


def restores(gateway, result) -> float:
    """gateway_kv_restores_total of "a" for result."""
    return gateway.metric(RESTORES, model="a", result=result)


def test_a_conversation_saved_at_the_unload_is_restored_at_the_next_load(gateway, access_log):
    messages = conversation("river")
    with late_load_listeners(gateway.fleet.pool):
        first = gateway.chat("a", messages)  # the first request after a's load (the first of the module)
        prompt = first.get_json()["usage"]["prompt_tokens"]
        hits = restores(gateway, "hit")
        gateway.swap_to("b")
        assert os.path.isfile(gateway.state_path("a", messages))
        second = gateway.chat("a", next_turn(messages, answer_of(first)))
    assert cached_tokens(second) >= prompt  # the first turn's prompt came from disk, not computed
    line = access_log.line(second.headers["x-request-id"])
    assert line["kv_restored"] >= prompt
    assert restores(gateway, "hit") == hits + 1
    # The restored slot goes on serving the conversation: its third turn finds it live, restoring nothing.
    third = gateway.chat("a", next_turn(next_turn(messages, answer_of(first)), answer_of(second)))
    assert cached_tokens(third) >= second.get_json()["usage"]["prompt_tokens"]
    assert restores(gateway, "hit") == hits + 1


def test_two_requests_of_one_conversation_at_once_restore_it_once(gateway):
    messages = conversation("lantern")
    first = gateway.chat("a", messages)
    gateway.swap_to("b")
    before = {result: restores(gateway, result) for result in ("hit", "failed", "missing", "mismatch")}
    later = next_turn(messages, answer_of(first))
    answers, failures = [], []

    def send():
        try:
            answers.append(gateway.chat("a", later))
        except BaseException as error:  # noqa: BLE001 - told to the test below
            failures.append(error)

    # Both wait for "a" to load, then ask where to run at once: one restores, the other computes its prompt.
    senders = [threading.Thread(target=send) for _ in range(2)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)
    assert not failures and len(answers) == 2
    after = {result: restores(gateway, result) for result in before}
    assert after == {**before, "hit": before["hit"] + 1}
    assert max(cached_tokens(answer) for answer in answers) >= first.get_json()["usage"]["prompt_tokens"]


def test_a_truncated_state_is_dropped_and_the_request_still_answers(gateway):
    messages = conversation("harbour")
    first = gateway.chat("a", messages)
    gateway.swap_to("b")
    path = gateway.state_path("a", messages)
    with open(path, "r+b") as state:  # cut short in its data, as by a full disk
        state.truncate(os.path.getsize(path) - 4096)
    failed = restores(gateway, "mismatch") + restores(gateway, "failed")
    second = gateway.chat("a", next_turn(messages, answer_of(first)))
    assert cached_tokens(second) == 0
    assert restores(gateway, "mismatch") + restores(gateway, "failed") == failed + 1
    assert not os.path.exists(path)  # dropped: never tried again
    assert gateway.chat("a", [{"role": "user", "content": "still there?"}]).status_code == 200
    assert gateway.supervisor("a").restarts == 0  # the file never reached llama.cpp, which it could bring down


def test_a_new_session_with_the_same_system_prompt_restores_anothers_state(gateway, access_log):
    # Claude Code's `claude -p` run again: the same long system prompt, other messages. Its first turn has no
    # state of its own; the first session's begins with the same system prompt, and llama.cpp reuses that part.
    system = conversation("beacon")[0]["content"]
    first = {"model": "a", "max_tokens": 4, "system": system, "messages": [{"role": "user", "content": "Hello."}]}
    gateway.post("/v1/messages", first)
    gateway.swap_to("b")
    folder = os.path.join(gateway.app.config["KV_CACHE_DIR"], gateway.supervisor("a").kv_identity)
    assert os.path.isfile(os.path.join(folder, prefix_keys(first)[-1].hex() + ".state"))
    hits = restores(gateway, "hit")
    second = {**first, "messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}]}
    response = gateway.post("/v1/messages", second)
    tokenized = requests.post(gateway.supervisor("a").url + "/tokenize", json={"content": system}, timeout=30)
    system_tokens = len(tokenized.json()["tokens"])
    assert system_tokens > 500
    assert response.get_json()["usage"]["cache_read_input_tokens"] >= system_tokens  # restored, not computed
    assert restores(gateway, "hit") == hits + 1
    assert access_log.line(response.headers["x-request-id"])["kv_restored"] >= system_tokens


def test_a_clients_own_id_slot_does_not_move_the_request_off_the_gateways_slot(gateway):
    messages = conversation("meadow")
    first = gateway.chat("a", messages)
    holder = gateway.warm.model("a").slots.holder(prefix_keys({"messages": messages}))
    assert holder is not None
    later = next_turn(messages, answer_of(first))
    # The slot that does not hold the conversation: run there, its prompt would be computed again.
    second = gateway.chat("a", later, id_slot=1 - holder[0])
    assert cached_tokens(second) >= first.get_json()["usage"]["prompt_tokens"]
    assert gateway.chat("a", [{"role": "user", "content": "hi"}], id_slot=99).status_code == 200


def test_a_model_run_elsewhere_gets_the_clients_own_bytes(gateway, httpserver):
    raw = b'{"model": "far",  "messages": [{"role": "user", "content": "hi"}], "id_slot": 7}'
    seen = []

    def answer(request):
        seen.append(request.get_data())
        return Response(json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "far",
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": "hello"}}],
                                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
                        content_type="application/json")
    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_handler(answer)
    response = gateway.client.post("/v1/chat/completions", data=raw, content_type="application/json")
    response.close()
    assert response.status_code == 200, response.get_data(as_text=True)
    assert seen == [raw]
