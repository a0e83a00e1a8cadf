"""The links between warm conversations and the rest of the gateway, each alone: where a request llama.cpp placed
itself ran (WarmGateway.slot_that_ran, from a /slots answer), a save's or restore's call bounded by its own timeout
(links.poster), and a saver's claim given back to the queue it was taken from (links.LiveQueue)."""
import json
import threading
import time
import types

import pytest
from werkzeug import Response

from service.proxy.upstream import Upstream
from service.warm.links import LiveQueue, poster
from service.warm.wiring import SLOT_TOKENS_SLACK, WarmGateway


def slot(number, task, tokens=100, busy=False) -> dict:
    """One slot as llama.cpp's /slots?fields=all tells it (the fields slot_that_ran reads)."""
    return {"id": number, "id_task": task, "n_prompt_tokens": tokens, "is_processing": busy}


# /slots answer (status, JSON), the prompt and completion tokens the client was told (None: any prompt) -> the
# slot that ran. After a request llama.cpp counts its prompt and what it generated together (less the last token).
SLOTS_ANSWERS = {
    "the idle slot of the latest task": ((200, [slot(0, 5), slot(1, 9)]), (100, 0), 1),
    "a busy slot's later task is another request's": ((200, [slot(0, 5), slot(1, 12, busy=True)]), (100, 0), 0),
    "a prompt counted a few tokens apart": ((200, [slot(0, 7, tokens=100 + SLOT_TOKENS_SLACK)]), (100, 0), 0),
    "a prompt and what it generated": ((200, [slot(0, 7, tokens=100 + 207 - 1)]), (100, 207), 0),
    "more than it generated": ((200, [slot(0, 7, tokens=101 + 207 + SLOT_TOKENS_SLACK)]), (100, 207), None),
    "a shorter prompt ran last": ((200, [slot(0, 7, tokens=99 - SLOT_TOKENS_SLACK)]), (100, 207), None),
    "any prompt (an embedding)": ((200, [slot(0, 3, tokens=4), slot(1, 2)]), (None, None), 0),
    "a slot without a task": ((200, [{"id": 0, "is_processing": False}]), (None, None), None),
    "every slot busy": ((200, [slot(0, 5, busy=True), slot(1, 6, busy=True)]), (None, None), None),
    "no /slots (--no-slots)": ((501, {"error": {"code": 501, "message": "This server does not support slots"}}),
                               (None, None), None),
    "not a list": ((200, {"slots": []}), (None, None), None),
}


@pytest.mark.parametrize("case", list(SLOTS_ANSWERS))
def test_the_slot_that_ran_is_the_idle_one_of_the_latest_task(httpserver, case):
    (status, answer), (prompt_tokens, completion_tokens), expected = SLOTS_ANSWERS[case]
    httpserver.expect_request("/slots", method="GET", query_string="fields=all").respond_with_json(answer, status)
    base_url = httpserver.url_for("").rstrip("/")
    upstream = Upstream({base_url: 0}, timeouts={"models": (2, 2)})
    try:
        warm = WarmGateway(None, None, None, None, upstream)
        model = types.SimpleNamespace(base_url=base_url)
        assert warm.slot_that_ran(model, prompt_tokens, completion_tokens) == expected
    finally:
        upstream.close()


def test_the_slot_that_ran_is_unknown_without_a_way_to_ask():
    assert WarmGateway(None, None, None, None).slot_that_ran(types.SimpleNamespace(base_url="x"), None) is None


@pytest.fixture
def upstream(httpserver):
    """The app's kind of Upstream, to pytest-httpserver."""
    session = Upstream({httpserver.url_for("").rstrip("/"): 0}, timeouts={"completions": (2, 600)})
    yield session
    session.close()


def test_a_call_to_llama_cpps_slots_gives_status_and_json(httpserver, upstream):
    httpserver.expect_request("/slots/0", method="POST", query_string="action=save",
                              json={"filename": "k.tmp"}).respond_with_json({"n_saved": 3})
    httpserver.expect_request("/slots/1", method="POST").respond_with_data("not json", status=400)
    post, base_url = poster(upstream), httpserver.url_for("").rstrip("/")
    assert post(base_url, "/slots/0?action=save", {"filename": "k.tmp"}, 5.0) == (200, {"n_saved": 3})
    assert post(base_url, "/slots/1?action=restore", {"filename": "k.tmp"}, 5.0) == (400, None)


def test_a_call_to_llama_cpps_slots_ends_at_its_own_timeout(httpserver, upstream):
    answer = threading.Event()  # the slow llama.cpp answers only once the test has its result

    def slow(request):
        answer.wait(10)
        return Response(json.dumps({"n_restored": 1}), content_type="application/json")
    httpserver.expect_request("/slots/0", method="POST").respond_with_handler(slow)
    started = time.monotonic()
    try:
        result = poster(upstream, connect_timeout_s=2.0)(httpserver.url_for("").rstrip("/"),
                                                          "/slots/0?action=restore", {"filename": "k"}, 0.3)
        took = time.monotonic() - started
    finally:
        answer.set()
    assert result == (502, None)
    assert took < 5  # the read timeout ended it, not the answer (held 10 s) nor the session's 600 s


class FakeQueue:
    """A fair queue's saver side: every slot idle; what was given back, kept."""

    def __init__(self):
        self.claimed, self.unclaimed = [], []

    def claim_idle(self, slot) -> bool:
        """Take slot (always idle here)."""
        self.claimed.append(slot)
        return True

    def unclaim(self, slot):
        """Give slot back."""
        self.unclaimed.append(slot)


class FakeGateway:
    """A WarmGateway's router and scheduler: the route of a model, and its queue, are whatever the test set."""

    def __init__(self, queue):
        self.queue = queue
        self.router = types.SimpleNamespace(route=self._route)
        self.scheduler = types.SimpleNamespace(queue_for=lambda route: route.queue)

    def _route(self, name):
        if self.queue is None:
            raise LookupError(name)  # the model a reload removed
        return types.SimpleNamespace(queue=self.queue)


def test_a_claim_is_given_back_to_the_queue_it_was_taken_from_after_a_reload():
    before, after = FakeQueue(), FakeQueue()
    gateway = FakeGateway(before)
    live = LiveQueue(gateway, "a")
    assert live.claim_idle(1)
    gateway.queue = after  # a reload gave the model a new route, and a new queue
    live.unclaim(1)
    assert before.unclaimed == [1] and after.unclaimed == []
    live.unclaim(1)  # given back once: a second call does nothing
    assert before.unclaimed == [1]


def test_a_model_without_a_route_has_nothing_to_claim():
    gateway = FakeGateway(None)
    live = LiveQueue(gateway, "a")
    assert live.claim_idle(0) is False
    assert live.idle_slots() == []
    live.unclaim(0)  # nothing claimed: nothing to give back, and no error
