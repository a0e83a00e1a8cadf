"""Warm conversations against a real llama.cpp started with --slot-save-path: a slot saved through WarmModel.save is
restored into another slot (also by a new WarmConversations over the same root, as after a gateway restart), and the
next request in that slot finds its prompt cached; what must not be restored is not; the saver saves idle slots."""
import os
import threading

import pytest
import requests

from service.llama.supervisor import LlamaSupervisor
from service.warm.conversations import WarmConversations
from service.warm.identity import llama_build, model_identity
from service.warm.index import file_digest
from service.warm.prefix import preamble_length, prefix_keys

FLAGS = ["--ctx-size", "2048", "--parallel", "2"]
MIN_TOKENS = 200  # the chats below hold about 400 tokens, a "hi" a few dozen


def post(base_url, path, body, timeout):
    """The facade's way to llama.cpp, as the gateway's would be: (status, parsed JSON)."""
    response = requests.post(base_url + path, json=body, timeout=timeout)
    return response.status_code, response.json()


class FakeQueue:
    """The fair queue's slot claims (claim_idle/unclaim/idle_slots); busy: slots a request holds."""

    def __init__(self, parallel):
        self.parallel, self.busy, self.claimed, self.claims = parallel, set(), set(), []

    def claim_idle(self, slot):
        if slot in self.busy or slot in self.claimed:
            return False
        self.claimed.add(slot)
        self.claims.append(slot)
        return True

    def unclaim(self, slot):
        self.claimed.discard(slot)

    def idle_slots(self):
        return [slot for slot in range(self.parallel) if slot not in self.busy | self.claimed]


@pytest.fixture(scope="module")
def warm_llama(demo_model_path, tmp_path_factory):
    """A real llama.cpp (no host-memory prompt cache: only a restore can fill a slot) saving under root."""
    root = str(tmp_path_factory.mktemp("kv"))
    identity = model_identity(demo_model_path, FLAGS, llama_build())
    directory = WarmConversations(root, 64, MIN_TOKENS, 0, post).slot_save_path(identity)
    supervisor = LlamaSupervisor(demo_model_path, ctx=2048, parallel=2, threads=1, embeddings=False, cache_ram=0,
                                 startup_timeout=60, args=("--slot-save-path", directory)).start()
    supervisor.root, supervisor.identity = root, identity
    yield supervisor
    supervisor.stop()


@pytest.fixture
def warm(warm_llama):
    """A fresh facade over the llama.cpp's root, its model attached with a fake queue."""
    conversations = WarmConversations(warm_llama.root, 64, MIN_TOKENS, 0, post)
    conversations.attach("demo", warm_llama.url, warm_llama.identity, 2, FakeQueue(2))
    return conversations


def chat(llama, topic, slot) -> tuple:
    """A chat of a few hundred tokens in slot; (its prefix keys, its usage)."""
    body = {"messages": [{"role": "system", "content": "You answer briefly."},
                         {"role": "user", "content": " ".join(f"{topic}{n}" for n in range(60))}],
            "max_tokens": 4, "id_slot": slot}
    response = requests.post(llama.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return prefix_keys(body), response.json()["usage"]


def ran(warm, llama, topic, slot) -> list:
    """A chat in slot, told to the facade as the request path would; its keys."""
    keys, usage = chat(llama, topic, slot)
    warm.model("demo").finished(slot, keys, usage["total_tokens"], ok=True)
    return keys


def test_a_saved_slot_is_restored_into_another_after_a_restart_and_its_prompt_is_cached(warm, warm_llama):
    keys = ran(warm, warm_llama, "apple", 1)
    assert warm.model("demo").save(1)
    # The gateway restarts: a new facade over the same root finds the state by the same (stable) keys.
    restarted = WarmConversations(warm_llama.root, 64, MIN_TOKENS, 0, post)
    model = restarted.attach("demo", warm_llama.url, warm_llama.identity, 2, FakeQueue(2))
    plan = model.plan(keys)
    assert plan.prefer == () and plan.restore[0] == keys[-1]
    tokens = model.restore(0, plan)
    assert tokens == plan.restore[1]["tokens"]
    assert model.plan(keys) == ((0,), None)  # held live now: placed there, nothing restored twice
    _, usage = chat(warm_llama, "apple", 0)
    assert usage["prompt_tokens"] > 100
    assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 2
    assert restarted.counters()["demo"]["restores"]["hit"] == 1
    assert restarted.counters()["demo"]["restored_tokens"] == tokens
    assert restarted.stats()["demo"]["states"] >= 1


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_state_is_dropped_never_loaded_and_the_slot_still_answers(warm, warm_llama, damage):
    keys = ran(warm, warm_llama, "pear" + damage, 1)
    model = warm.model("demo")
    assert model.save(1)
    path = model.index.path(keys[-1])
    with open(path, "r+b") as file:
        if damage == "truncate":  # cut short in its data: llama.cpp 2026.10 aborts on such a file
            file.truncate(os.path.getsize(path) // 2)
        else:  # one byte changed, the size the same
            file.seek(os.path.getsize(path) // 2)
            byte = file.read(1)
            file.seek(-1, os.SEEK_CUR)
            file.write(bytes([byte[0] ^ 0xFF]))
    model.slots.clear()  # as after a restart: no live slot holds it
    plan = model.plan(keys)
    assert model.restore(0, plan) is None
    assert not os.path.exists(path) and model.index.lookup(keys) is None
    assert warm.counters()["demo"]["restores"]["mismatch"] == 1
    _, usage = chat(warm_llama, "pear" + damage, 0)  # computed again, answered all the same
    assert usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"] // 2


def test_a_failing_upstream_or_a_missing_file_never_raises(warm, warm_llama):
    keys = ran(warm, warm_llama, "plum", 1)
    model = warm.model("demo")
    assert model.save(1)
    model.slots.clear()

    def refused(*_):
        raise requests.ConnectionError("refused")

    warm.post = refused
    assert model.restore(0, model.plan(keys)) is None and model.index.lookup(keys) is None
    keys = ran(warm, warm_llama, "fig", 1)
    assert not model.save(1)  # the upstream cannot be reached: not saved, not raised
    warm.post = post
    assert model.save(1)
    model.slots.clear()
    plan = model.plan(keys)
    os.remove(model.index.path(keys[-1]))  # deleted by hand between the plan and the restore
    assert model.restore(0, plan) is None
    # A file intact as recorded that llama.cpp refuses all the same (400): dropped.
    with open(model.index.path(keys[-1]), "wb") as file:
        file.write(b"not a state")
    model.index.add(keys[-1], 500, len(b"not a state"), file_digest(model.index.path(keys[-1])))
    assert model.restore(0, model.plan(keys)) is None and model.index.lookup(keys) is None
    assert warm.counters()["demo"]["restores"] == {"hit": 0, "failed": 2, "missing": 1, "mismatch": 0}
    assert warm.counters()["demo"]["saves"] == {"ok": 2, "failed": 1, "skipped": 0}


def test_a_state_made_under_another_identity_is_never_restored(warm, warm_llama, demo_model_path):
    keys = ran(warm, warm_llama, "kiwi", 1)
    assert warm.model("demo").save(1)
    other = model_identity(demo_model_path, ["--ctx-size", "1024", "--parallel", "2"], llama_build())
    assert other != warm_llama.identity
    model = warm.attach("demo", warm_llama.url, other, 2, FakeQueue(2))
    assert warm.slot_save_path(other) != warm.slot_save_path(warm_llama.identity)
    assert model.plan(keys).restore is None


def test_two_requests_of_one_conversation_at_once_restore_once(warm, warm_llama):
    keys = ran(warm, warm_llama, "lime", 1)
    model = warm.model("demo")
    assert model.save(1)
    model.slots.clear()
    barrier, plans = threading.Barrier(4), []

    def plan():
        barrier.wait()
        plans.append(model.plan(keys))

    threads = [threading.Thread(target=plan) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    restoring = [plan for plan in plans if plan.restore is not None]
    assert len(restoring) == 1
    model.abandon(restoring[0])  # its request gave up waiting: another may restore it now
    again = model.plan(keys)
    assert again.restore is not None
    model.abandon(restoring[0])  # the first request's end, late: it must not free the restore now under way
    assert model.plan(keys).restore is None
    assert model.restore(0, again) is not None
    assert model.plan(keys).restore is None


def test_the_saver_saves_idle_long_slots_while_it_holds_them_claimed(warm, warm_llama):
    model = warm.model("demo")
    short = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "id_slot": 0}
    usage = requests.post(warm_llama.url + "/v1/chat/completions", json=short, timeout=60).json()["usage"]
    assert usage["total_tokens"] < MIN_TOKENS
    model.finished(0, prefix_keys(short), usage["total_tokens"], ok=True)  # too short to be worth saving
    keys = ran(warm, warm_llama, "date", 1)
    model.queue.busy.add(1)  # a request holds slot 1: not saved while it runs
    warm.saver.idle_s = 0.0
    assert warm.saver.tick() == 0 and model.index.lookup(keys) is None
    model.queue.busy.clear()
    assert warm.saver.tick() == 1
    assert model.queue.claims == [1] and model.queue.claimed == set()  # claimed for the save, then given back
    assert model.index.lookup(keys)[0] == keys[-1]
    assert warm.saver.tick() == 0  # saved already
    model.finished(1, keys, 500, ok=True)
    assert warm.save_all("demo") == 1  # before an unload: every unsaved long slot, idle or not


def test_a_full_disk_skips_the_save(warm_llama):
    warm = WarmConversations(warm_llama.root, 64, MIN_TOKENS, 0, post, margin_bytes=2 ** 62)
    model = warm.attach("demo", warm_llama.url, warm_llama.identity, 2, FakeQueue(2))
    keys = ran(warm, warm_llama, "nut", 1)
    assert not model.save(1) and model.index.lookup(keys) is None
    assert warm.counters()["demo"]["saves"]["skipped"] == 1


def test_a_failed_or_skipped_save_waits_for_new_content_and_an_emptier_slot_is_forgotten(warm, warm_llama):
    model, saver = warm.model("demo"), warm.saver
    saver.idle_s = 0.0
    keys = ran(warm, warm_llama, "cherry", 1)
    warm.post = lambda *_: (500, None)  # llama.cpp refuses the save
    assert saver.tick() == 0 and saver.tick() == 0
    assert warm.counters()["demo"]["saves"]["failed"] == 1 and model.queue.claims == [1]  # tried once, not per tick
    warm.post = post
    assert saver.tick() == 0  # still the content that failed: not tried again
    ran(warm, warm_llama, "cherry", 1)  # the next turn: new content, worth a save again
    assert saver.tick() == 1 and model.index.lookup(keys)[0] == keys[-1]
    warm.budget.margin_bytes = 2 ** 62  # a full disk
    ran(warm, warm_llama, "cherry", 1)
    assert saver.tick() == 0 and saver.tick() == 0
    assert warm.counters()["demo"]["saves"]["skipped"] == 1
    warm.budget.margin_bytes = 0
    # The table says slot 1 holds far more than llama.cpp saves from it: it holds something else, now unknown.
    model.finished(1, ran(warm, warm_llama, "quince", 1), 100000, ok=True)
    assert saver.tick() == 0 and model.slots.content(1) is None
    assert warm.counters()["demo"]["saves"] == {"ok": 1, "failed": 2, "skipped": 1}


def test_save_all_waits_for_the_save_the_saver_thread_has_under_way(warm, warm_llama, monkeypatch):
    model, saver = warm.model("demo"), warm.saver
    saver.idle_s = 0.0
    keys = ran(warm, warm_llama, "grape", 1)
    entered, release, waiting = threading.Event(), threading.Event(), threading.Event()

    def held_save(base_url, path, body, timeout):
        if "action=save" in path:
            entered.set()
            release.wait(30)
        return post(base_url, path, body, timeout)

    def wait(timeout=None, real=saver._changed.wait):
        if timeout is None or timeout > 0:  # blocked, not merely looking
            waiting.set()
        return real(timeout)

    def save_all():
        results["save_all"] = warm.save_all("demo")
        results["saved by then"] = model.index.lookup(keys) is not None

    warm.post = held_save
    monkeypatch.setattr(saver._changed, "wait", wait)
    results = {}
    ticking = threading.Thread(target=lambda: results.update(tick=saver.tick()))
    ticking.start()
    assert entered.wait(30)  # the thread is saving slot 1 now, holding it claimed
    unloading = threading.Thread(target=save_all)
    unloading.start()
    try:
        assert waiting.wait(10)  # before an unload: waited for, not skipped (the unload would cut it short)
    finally:
        release.set()
        ticking.join(30)
        unloading.join(30)
    # Returned once the thread's save was done; saved once, by the thread: nothing left unsaved.
    assert results == {"tick": 1, "save_all": 0, "saved by then": True}
    assert model.index.lookup(keys)[0] == keys[-1] and not model.slots.unsaved(1)


def agent_chat(warm, llama, system, question, slot, earlier=()) -> tuple:
    """A chat of an agent's session in slot (its system prompt, then its own messages), told to the facade as the
    request path would; (its keys, its usage). system None: none."""
    leading = [{"role": "system", "content": system}] if system is not None else []
    body = {"messages": [*leading, *earlier, {"role": "user", "content": question}],
            "max_tokens": 4, "id_slot": slot}
    response = requests.post(llama.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    warm.model("demo").finished(slot, prefix_keys(body), usage["total_tokens"], True, preamble_length(body))
    return prefix_keys(body), usage


def test_a_new_session_restores_the_newest_state_that_begins_with_its_system_prompt(warm, warm_llama):
    model, system = warm.model("demo"), " ".join(f"compass{n % 97}" for n in range(40))
    system_tokens = len(requests.post(warm_llama.url + "/tokenize", json={"content": system}, timeout=30)
                        .json()["tokens"])
    first, _ = agent_chat(warm, warm_llama, system, "Which way is north?", 1)
    assert model.save(1) and model.index.aliases() == {first[0]: first[-1]}
    model.slots.clear()  # as after a restart: no live slot holds the system prompt
    second = prefix_keys({"messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]})
    plan = model.plan(second)
    assert plan.restore[0] == first[-1]  # the first session's state, found under its preamble
    # One file, restored once at a time: neither its own conversation nor a third session restores it meanwhile.
    assert model.plan(first).restore is None and model.plan([second[0], bytes(16)]).restore is None
    assert model.restore(0, plan) == plan.restore[1]["tokens"]
    second, usage = agent_chat(warm, warm_llama, system, "Hi", 0)
    assert usage["prompt_tokens_details"]["cached_tokens"] >= system_tokens  # not computed again
    assert model.save(0) and model.index.aliases() == {first[0]: second[-1]}  # the newest save wins the alias
    # The first session's next turn: its earlier state is deleted, and the alias moves to the new one, kept.
    later, _ = agent_chat(warm, warm_llama, system, "And south?", 1,
                          earlier=[{"role": "user", "content": "Which way is north?"},
                                   {"role": "assistant", "content": "Up."}])
    assert model.save(1) and not os.path.exists(model.index.path(first[-1]))
    assert model.index.aliases() == {first[0]: later[-1]} and os.path.isfile(model.index.path(later[-1]))
    assert os.path.isfile(model.index.path(second[-1]))  # another session's state: not an earlier turn
    # Without a system prompt there is no preamble: saved under its own key only, as before.
    alone, _ = agent_chat(warm, warm_llama, None, " ".join(f"lone{n}" for n in range(60)), 1)
    assert model.save(1) and model.index.lookup(alone)[0] == alone[-1]
    assert model.index.aliases() == {first[0]: later[-1]}
