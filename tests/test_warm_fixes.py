"""Warm conversations through the gateway with real llama.cpp, where requests and models do what a conversation's
bookkeeping must survive: an embedding in a conversation's slot, a queue of more turns than llama.cpp has slots, a
model file replaced while the gateway runs, a turn refused by the queue. One gateway for the module (one model
loaded at a time, embeddings served, one request per client waiting); each test its own models or conversation,
and counters read as differences."""
import os
import threading

import pytest

from service.models.demo_model import write_demo_model
from service.policy.auth import OPEN_ACCESS_CLIENT
from service.warm.saver import Saver
from tests.warm_helpers import Gateway, answer_of, cached_tokens, conversation, model_copies, next_turn

pytestmark = pytest.mark.llama
# "a" and "b" swap; "c" takes more turns at once than its llama.cpp has slots (LLAMA_PARALLEL=2); "e" is replaced.
MODELS = ("a", "b", "c", "e")
SPEC_FIELDS = {"c": {"slots": 3}}


@pytest.fixture(scope="module")
def gateway(demo_model_path, tmp_path_factory):
    """The gateway over MODELS, serving embeddings, with one request per client allowed to wait."""
    folder = tmp_path_factory.mktemp("fixes")
    running = Gateway(model_copies(demo_model_path, str(folder / "models"), MODELS), folder / "kv",
                      spec_fields=SPEC_FIELDS, LLAMA_EMBEDDINGS="true", QUEUE_MAX_PER_CLIENT="1")
    running.warm.conversations.saver.idle_s = 3600.0  # saved when a test says (save_all) or before an unload
    yield running
    running.stop()


def count(gateway, model, family, result) -> int:
    """How many saves or restores (family) of model ended in result, since the gateway started."""
    return gateway.warm.conversations.counters().get(model, {}).get(family, {}).get(result, 0)


def prompt_of(response) -> int:
    """The prompt tokens of a chat answer."""
    return response.get_json()["usage"]["prompt_tokens"]


# An embedding's input: llama.cpp runs one task per text, each in an idle slot of its choosing.
# Each its own two conversations (the module's gateway keeps the slots of earlier tests).
EMBEDDED = [pytest.param("hello there", ("apple", "kiwi"), id="one-text"),
            pytest.param(["hello there", "general kenobi"], ("mango", "lime"), id="two-texts")]


@pytest.mark.parametrize("embedded, topics", EMBEDDED)
def test_an_embedding_between_two_turns_does_not_leave_a_conversation_counted_live(gateway, embedded, topics):
    talks = {topic: conversation(topic) for topic in topics}
    firsts = {topic: gateway.chat("a", messages) for topic, messages in talks.items()}  # one slot each
    assert gateway.warm.conversations.save_all("a") == 2
    # llama.cpp runs it in a slot of its choosing (no id_slot): one of the two conversations is overwritten there.
    gateway.post("/v1/embeddings", {"model": "a", "input": embedded})
    for topic, messages in talks.items():
        later = gateway.chat("a", next_turn(messages, answer_of(firsts[topic])))
        # Restored from disk where the embedding overwrote it, else found in its live slot: never computed again.
        assert cached_tokens(later) >= prompt_of(firsts[topic]), topic


def test_a_queue_of_more_turns_than_llama_cpps_slots_hands_out_no_slot_ids(gateway):
    assert gateway.chat("c", [{"role": "user", "content": "hi"}]).status_code == 200  # c loaded
    route = gateway.app.extensions["router"].route("c")
    assert route.spec.slots == 3
    assert gateway.warm.numbered(route) is False
    scheduler = gateway.app.extensions["scheduler"]
    turns = [scheduler.enter(route, "counter") for _ in range(3)]
    try:
        assert [turn.slot for turn in turns] == [None, None, None]  # an id past llama.cpp's 2 would share a slot
    finally:
        for turn in turns:
            turn.release()
    answers, failures = [], []

    def send(topic):
        try:
            answers.append(gateway.chat("c", conversation(topic, words=20)))
        except BaseException as error:  # noqa: BLE001 - told to the test below
            failures.append(error)

    senders = [threading.Thread(target=send, args=(topic,)) for topic in ("fig", "plum", "pear")]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)
    assert not failures and len(answers) == 3


def test_a_llama_cpp_started_for_a_replaced_file_never_saves_and_the_next_load_does(gateway):
    supervisor = gateway.supervisor("e")
    old = os.path.join(gateway.app.config["KV_CACHE_DIR"], supervisor.kv_identity)
    write_demo_model(supervisor.model_path, seed=7)  # another model under e's path, e not loaded yet
    messages = conversation("pine")
    first = gateway.chat("e", messages)  # loads e: its llama.cpp saves into the old file's folder
    assert supervisor.kv_identity != os.path.basename(old)  # its next start gets the new file's folder
    assert gateway.warm.model("e") is None  # this llama.cpp: neither saved nor restored
    for _ in range(3):  # saver ticks that would save every long unsaved slot at once
        Saver(gateway.warm.conversations, idle_s=0.0).tick()
    assert gateway.warm.conversations.save_all("e") == 0
    assert count(gateway, "e", "saves", "failed") == 0
    leftovers = [name for name in os.listdir(old) if name.endswith(".tmp")] if os.path.isdir(old) else []
    assert leftovers == []
    gateway.swap_to("a")
    later = next_turn(messages, answer_of(first))
    gateway.chat("e", later)  # e's next load, started with the new file's folder
    gateway.swap_to("a")  # saved before the unload
    assert os.path.isfile(gateway.state_path("e", later))  # under the new identity (the supervisor's now)
    assert count(gateway, "e", "saves", "ok") == 1 and count(gateway, "e", "saves", "failed") == 0


def test_a_turn_refused_by_the_queue_does_not_keep_the_next_from_restoring(gateway):
    messages = conversation("cedar")
    first = gateway.chat("a", messages)
    gateway.swap_to("b")  # saved before the unload
    gateway.swap_to("a")  # a loaded again, the conversation only on disk
    later = next_turn(messages, answer_of(first))
    route = gateway.app.extensions["router"].route("a")
    scheduler = gateway.app.extensions["scheduler"]
    held = [scheduler.enter(route, "holder") for _ in range(2)]  # both slots busy
    waiting = scheduler.enter(route, OPEN_ACCESS_CLIENT)  # the client's one request allowed to wait
    try:
        assert all(turn.granted for turn in held) and not waiting.granted
        refused = gateway.post("/v1/chat/completions", {"model": "a", "messages": later, "max_tokens": 4},
                               status=429)
        assert refused.get_json()["error"]["code"] == "queue_full"
    finally:
        for turn in (waiting, *held):
            turn.release()
    hits = count(gateway, "a", "restores", "hit")
    second = gateway.chat("a", later)
    assert cached_tokens(second) >= prompt_of(first)  # restored: the refused turn's plan did not hold it
    assert count(gateway, "a", "restores", "hit") == hits + 1
