"""The fair queue's rules: slots first come first served while free, then round robin over clients (weights give
more turns), per-client caps, timeouts, leaving clients, and each turn released once; and at shutdown, every wait
(a slot, a model's load) ended with 503 once the grace is over."""
import gc
import threading
import time

import pytest

from service.errors import ShuttingDown
from service.llama.pool import ModelPool
from service.llama.pooled_model import PooledModel
from service.operations.lifecycle import Lifecycle
from service.operations.request_log import RequestRecord
from service.proxy.admission import Admission
from service.models.spec import ModelSet, ModelSpec
from service.proxy.disconnect import DisconnectWatch
from service.proxy.routing import Router
from service.proxy.scheduler import FairQueue, QueueFull, QueueTimeout, Scheduler, SlotCounts
from tests.fakes import Clock, FakeSupervisor


def make_queue(slots=1, timeout_s=60.0, max_per_client=64, clock=None):
    return FairQueue("m", lambda: slots, timeout_s=timeout_s, max_per_client=max_per_client,
                     **({"clock": clock} if clock else {}))


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never came true"
        time.sleep(0.005)


def served_order(queue, turns):
    """Release the slot holder repeatedly and note whose turn is granted next."""
    order = []
    holder = next(turn for turn in turns if turn.granted)
    pending = [turn for turn in turns if not turn.granted]
    while pending:
        holder.release()
        holder = next(turn for turn in pending if turn.granted)
        pending.remove(holder)
        order.append(holder.client)
    return order


def test_free_slots_are_taken_at_once_then_requests_wait():
    queue = make_queue(slots=2)
    first, second, third = (queue.enter("a") for _ in range(3))
    assert first.granted and second.granted and not third.granted and queue.depth == 1
    first.release()
    assert third.granted and queue.depth == 0 and queue.in_flight == 2


def test_a_burst_from_one_client_does_not_starve_another():
    queue = make_queue(slots=1)
    turns = [queue.enter("a") for _ in range(6)] + [queue.enter("b")]
    assert served_order(queue, turns) == ["a", "b", "a", "a", "a", "a"]  # b's turn comes right after a's next


def test_round_robin_over_clients_and_weights_give_more_turns():
    queue = make_queue(slots=1)
    holder = queue.enter("x")
    turns = [holder] + [queue.enter(client, weight) for client, weight in
                        [("a", 2)] * 4 + [("b", 1)] * 4]
    assert served_order(queue, turns) == ["a", "a", "b", "a", "a", "b", "b", "b"]


def test_a_client_past_its_cap_is_refused_at_once():
    queue = make_queue(slots=1, max_per_client=2)
    queue.enter("a")
    queue.enter("a"), queue.enter("a")
    with pytest.raises(QueueFull) as refused:
        queue.enter("a")
    assert refused.value.status == 429 and refused.value.code == "queue_full"
    assert not queue.enter("b").granted  # another client still queues


def test_a_request_that_waits_too_long_times_out_and_leaves_the_queue():
    clock = Clock()
    queue = make_queue(slots=1, timeout_s=10, clock=clock)
    holder, waiting = queue.enter("a"), queue.enter("b")
    assert waiting.wait(0) is False  # its own short wait: it may wait again
    clock.now += 11
    with pytest.raises(QueueTimeout) as timed_out:
        waiting.wait(None)
    assert timed_out.value.status == 503 and timed_out.value.headers["Retry-After"]
    assert queue.depth == 0
    holder.release()
    assert queue.in_flight == 0  # nobody was waiting any more


def test_a_client_that_leaves_is_dropped_from_its_queue_at_once():
    queue = make_queue(slots=1)
    holder, leaving, staying = queue.enter("a"), queue.enter("b"), queue.enter("c")
    gone = threading.Event()
    threading.Timer(0.05, gone.set).start()
    assert leaving.wait(5, gone.is_set) is False and leaving.done
    assert queue.depth == 1
    holder.release()
    assert staying.granted and not leaving.granted


def test_release_is_once_and_a_waiting_turn_released_just_leaves():
    queue = make_queue(slots=1)
    holder, waiting = queue.enter("a"), queue.enter("b")
    waiting.release()
    assert queue.depth == 0
    holder.release()
    holder.release()
    assert queue.in_flight == 0


def test_unknown_slots_mean_no_limit_and_the_count_is_asked_once_there_is_concurrency():
    asked = []

    class Replica:
        url, ejected, slots = "http://r", False, None
        route = type("Route", (), {"name": "m", "spec": None})()

    route = type("Route", (), {"name": "m", "replicas": [Replica()]})()
    counts = SlotCounts(lambda url: asked.append(url) or {"total_slots": 2})
    scheduler = Scheduler(counts, timeout_s=60, max_per_client=64)
    first = scheduler.enter(route, "a")
    assert first.granted and asked == []  # one request alone needs no slot count
    second, third = scheduler.enter(route, "a"), scheduler.enter(route, "a")
    assert asked == ["http://r"] and second.granted and not third.granted
    assert route.replicas[0].slots == 2  # kept on the replica, for cache-aware placement


def routed_scheduler(spec, configured=None):
    """A scheduler of real routes, one per spec, whose llama-servers say they have 2 slots; and the routes."""
    counts = SlotCounts(lambda url: {"total_slots": 2}, configured)
    router = Router.from_models(ModelSet(tuple(spec)))
    return Scheduler(counts, timeout_s=60, max_per_client=64), router


def test_a_spec_s_slots_bound_its_model_and_a_reload_s_new_count_applies():
    scheduler, router = routed_scheduler([ModelSpec("m", upstreams=("http://r",), slots=1)], configured={"m": 3})
    route = router.route("m")
    first, second = scheduler.enter(route, "a"), scheduler.enter(route, "a")
    assert first.granted and not second.granted, "the spec's slots=1 did not bound the model"
    router.apply(ModelSet((ModelSpec("m", upstreams=("http://r",), slots=2),)))  # the same route, updated
    third = scheduler.enter(route, "a")
    assert second.granted and not third.granted


def test_a_reload_that_changes_llama_cpp_s_command_line_asks_its_slot_count_again():
    answers = {"total_slots": 2}
    scheduler = Scheduler(SlotCounts(lambda url: dict(answers)), timeout_s=60, max_per_client=64)
    local = {"m": "http://r"}  # a replaced model keeps its URL
    router = Router.from_models(ModelSet((ModelSpec("m", source="/m.gguf", parallel=2),)), local)
    route = router.route("m")
    turns = [scheduler.enter(route, "a") for _ in range(3)]
    assert [turn.granted for turn in turns] == [True, True, False] and route.replicas[0].slots == 2
    answers["total_slots"] = 8  # --parallel 8 from now on
    router.apply(ModelSet((ModelSpec("m", source="/m.gguf", parallel=8),)), local)
    assert route.replicas[0].slots is None, "cache-aware placement would go on counting the old slots"
    turns.append(scheduler.enter(route, "a"))
    assert all(turn.granted for turn in turns), "the old llama.cpp's slot count still bounds the model"
    assert route.replicas[0].slots == 8


def test_without_a_spec_s_slots_the_configured_count_holds():
    scheduler, router = routed_scheduler([ModelSpec("m", upstreams=("http://r",))], configured={"m": 1})
    route = router.route("m")
    assert [scheduler.enter(route, "a").granted for _ in range(2)] == [True, False]


def test_the_queue_of_a_route_a_reload_removed_goes_with_it():
    scheduler, router = routed_scheduler([ModelSpec(name, upstreams=("http://r",)) for name in ("a", "b")])
    scheduler.enter(router.route("b"), "x").release()
    assert [queue.name for queue in scheduler.queues] == ["b"]
    router.apply(ModelSet((ModelSpec("a", upstreams=("http://r",)),)))  # b removed
    gc.collect()  # a route and its replicas refer to each other: the cycle collector frees them
    assert scheduler.queues == [], "a removed route's queue stays for ever"
    scheduler.enter(router.route("a"), "x").release()
    assert [queue.name for queue in scheduler.queues] == ["a"]


# At shutdown: once the grace is over, a request still waiting (for its model, for a slot) ends with ShuttingDown,
# and a slot freed by a cut call lets nobody through (service/proxy/admission.py, operations/lifecycle.py).

def admission_for(queue, lifecycle, hold=None):
    scheduler = type("OneQueue", (), {"enter": lambda self, route, client, prefer=(): queue.enter(client),
                                      "observe_wait": lambda self, model, waited_s: None})()
    return Admission(hold, scheduler, type("Route", (), {"name": "m"})(), "b",
                     RequestRecord("r", "POST", "/v1/chat/completions", time.perf_counter()), None, lifecycle)


def wait_in_thread(admission) -> list:
    """Run admission.wait() in a thread; the list gets what it returned or raised."""
    outcome = []

    def wait():
        try:
            outcome.append(admission.wait())
        except Exception as error:  # noqa: BLE001 - the test reads what it was
            outcome.append(error)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    outcome.append(thread)
    return outcome


def ended(outcome, timeout=5):
    """What the waiting thread's admission.wait() gave, once it ended."""
    outcome[0].join(timeout)
    assert len(outcome) == 2, "the wait did not end"
    return outcome[1]


def test_a_request_waiting_for_a_slot_ends_with_503_when_the_grace_is_over():
    queue, lifecycle = make_queue(slots=1), Lifecycle(DisconnectWatch())
    holder = queue.enter("a")
    outcome = wait_in_thread(admission_for(queue, lifecycle))
    wait_until(lambda: queue.depth == 1)
    lifecycle.cut = True
    assert isinstance(ended(outcome), ShuttingDown)
    assert queue.depth == 0  # out of the queue at once: the slot freed next is nobody's
    holder.release()
    assert queue.in_flight == 0


def test_a_slot_freed_after_the_cut_lets_nobody_through():
    # The holder's call is cut first and frees its slot, which the queue hands to the next: that one must not
    # be sent upstream.
    queue, lifecycle = make_queue(slots=1), Lifecycle(DisconnectWatch())
    holder = queue.enter("a")
    admission = admission_for(queue, lifecycle)
    assert admission.wait(timeout=0) is False  # queued
    lifecycle.cut = True
    holder.release()
    assert admission.turn.granted
    with pytest.raises(ShuttingDown):
        admission.wait()
    admission.release()
    assert queue.in_flight == 0


def test_a_request_waiting_for_its_model_to_load_ends_with_503_when_the_grace_is_over():
    supervisor = FakeSupervisor("http://a")
    supervisor.gate = threading.Event()  # the load never ends on its own
    pool = ModelPool([PooledModel("a", supervisor)], max_loaded=1, load_timeout_s=60)
    pool.start()
    replica = type("Replica", (), {"url": "http://a"})()
    route = type("Route", (), {"name": "a", "removed": False, "replicas": [replica]})()
    lifecycle = Lifecycle(DisconnectWatch())
    admission = admission_for(make_queue(), lifecycle, hold=pool.claim(route))
    outcome = wait_in_thread(admission)
    wait_until(lambda: supervisor.starts == 1)
    lifecycle.cut = True
    try:
        assert isinstance(ended(outcome), ShuttingDown)
        admission.release()
        assert pool.models["a"].waiting == 0
    finally:
        supervisor.gate.set()
        pool.stop()


def test_drain_ends_waiting_requests_and_waits_for_their_answers():
    queue, watch = make_queue(slots=1), DisconnectWatch()
    lifecycle = Lifecycle(watch)
    holder = queue.enter("a")
    lifecycle.begin()
    admission = admission_for(queue, lifecycle)
    answered = []

    def request():
        try:
            admission.wait()
        except ShuttingDown as error:
            answered.append(error.status)
        finally:
            admission.release()
            lifecycle.end()  # the policy's close, once the answer is sent

    threading.Thread(target=request, daemon=True).start()
    wait_until(lambda: queue.depth == 1)
    lifecycle.drain(0.05)
    # drain returns once the waiting request has answered (its log line written), not at its own timeout.
    assert answered == [503] and lifecycle.in_flight == 0 and lifecycle.cut and watch.closed
    holder.release()
