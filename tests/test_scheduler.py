"""The fair queue's rules: slots first come first served while free, then round robin over clients (weights give
more turns), per-client caps, timeouts, leaving clients, and each turn released once."""
import threading

import pytest

from service.proxy.scheduler import FairQueue, QueueFull, QueueTimeout, Scheduler, SlotCounts
from tests.fakes import Clock


def make_queue(slots=1, timeout_s=60.0, max_per_client=64, clock=None):
    return FairQueue("m", lambda: slots, timeout_s=timeout_s, max_per_client=max_per_client,
                     **({"clock": clock} if clock else {}))


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
        route = type("Route", (), {"name": "m"})()

    route = type("Route", (), {"name": "m", "replicas": [Replica()]})()
    counts = SlotCounts(lambda url: asked.append(url) or {"total_slots": 2})
    scheduler = Scheduler(counts, timeout_s=60, max_per_client=64)
    first = scheduler.enter(route, "a")
    assert first.granted and asked == []  # one request alone needs no slot count
    second, third = scheduler.enter(route, "a"), scheduler.enter(route, "a")
    assert asked == ["http://r"] and second.granted and not third.granted
    assert route.replicas[0].slots == 2  # kept on the replica, for cache-aware placement
