"""Slot ids in a numbered queue: a granted turn gets the free slot it prefers, else the one used least recently;
a preference never makes a request wait; the saver's claims (idle slots only, never granted while claimed, counted
against the slots); an unknown or shrunk slot count; and, under threads, no id ever held twice at once."""
import random
import threading
import time

from service.proxy.scheduler import FairQueue, Scheduler, SlotCounts
from service.proxy.slot_ids import SlotIds
from tests.fakes import Clock


def numbered_queue(slots=2, clock=None, numbered=True):
    """A numbered queue; slots: a count, or a one-item list the test may change."""
    count = slots if isinstance(slots, list) else [slots]
    return FairQueue("m", lambda: count[0], timeout_s=60.0, max_per_client=64, clock=clock or Clock(),
                     numbered=lambda: numbered)


def test_a_queue_that_is_not_numbered_hands_out_no_ids_and_refuses_claims():
    queue = FairQueue("m", lambda: 2, timeout_s=60.0, max_per_client=64)
    assert queue.claim_idle(0) is False and queue.idle_slots() == []
    turns = [queue.enter("a", prefer=(1,)) for _ in range(3)]
    assert [turn.granted for turn in turns] == [True, True, False] and {turn.slot for turn in turns} == {None}


def test_free_slots_go_never_used_first_then_least_recently_used():
    clock = Clock()
    queue = numbered_queue(slots=3, clock=clock)
    first, second, third = (queue.enter("a") for _ in range(3))
    assert [first.slot, second.slot, third.slot] == [0, 1, 2]
    clock.now += 1
    third.release()
    clock.now += 1
    first.release()  # slot 0 used after slot 2: slot 2 is the least recently used
    assert queue.enter("a").slot == 2
    assert queue.enter("a").slot == 0
    assert first.slot == 0, "a released turn should still say where it ran"


def test_a_free_preferred_slot_is_taken_a_busy_one_is_passed_over():
    queue = numbered_queue(slots=3)
    holder = queue.enter("a", prefer=(2,))
    assert holder.slot == 2
    other = queue.enter("b", prefer=(2, 1))  # 2 is busy: the next preferred free one
    assert other.slot == 1
    last = queue.enter("c", prefer=(2, 1))  # both busy: granted at once all the same, in the free slot
    assert last.granted and last.slot == 0
    waiting = queue.enter("d", prefer=(1,))
    assert not waiting.granted
    holder.release()
    assert waiting.granted and waiting.slot == 2  # its preferred slot is busy: it did not wait for it


def test_a_waiting_turn_granted_later_takes_its_preferred_slot_if_free():
    queue = numbered_queue(slots=2)
    first, second = queue.enter("a"), queue.enter("a")
    waiting = queue.enter("b", prefer=(1,))
    first.release()
    second.release()  # (the waiting turn took slot 0 at the first release)
    assert waiting.slot == 0
    again = queue.enter("b", prefer=(1,))
    assert again.slot == 1


def test_the_saver_claims_only_idle_slots_and_a_claimed_slot_is_never_granted():
    queue = numbered_queue(slots=2)
    holder = queue.enter("a")
    assert queue.claim_idle(holder.slot) is False, "a slot a request runs in was claimed"
    assert queue.claim_idle(1) is True and queue.claim_idle(1) is False
    assert queue.claim_idle(2) is False  # no such slot
    assert queue.idle_slots() == []
    waiting = queue.enter("b", prefer=(1,))
    assert not waiting.granted, "the claimed slot did not count against the slots"
    holder.release()
    assert waiting.granted and waiting.slot == 0
    assert queue.enter("c").granted is False


def test_unclaim_hands_the_slot_to_a_waiting_request_and_is_once():
    queue = numbered_queue(slots=1)
    assert queue.claim_idle(0)
    waiting = queue.enter("a")
    assert not waiting.granted
    queue.unclaim(0)
    assert waiting.granted and waiting.slot == 0
    queue.unclaim(0)  # not claimed any more: nothing happens
    late = queue.enter("b")
    assert not late.granted and queue.idle_slots() == []
    late.release()
    waiting.release()
    waiting.release()
    assert queue.idle_slots() == [0] and queue.in_flight == 0


def test_an_unknown_slot_count_hands_out_no_ids_and_no_slot_is_known_idle_while_such_a_turn_runs():
    count = [None]
    queue = numbered_queue(slots=count)
    anonymous = queue.enter("a")
    assert anonymous.granted and anonymous.slot is None
    count[0] = 2
    # The anonymous turn runs in a slot llama.cpp chose: none may be claimed, and it takes one of the two.
    assert queue.idle_slots() == [] and queue.claim_idle(0) is False
    numbered = queue.enter("a")
    assert numbered.slot == 0 and not queue.enter("a").granted
    anonymous.release()
    assert queue.in_flight == 2 and queue.idle_slots() == []  # the waiting one took slot 1
    numbered.release()
    assert queue.claim_idle(0)


def test_no_id_at_or_past_a_shrunk_slot_count_is_handed_out():
    count = [4]
    queue = numbered_queue(slots=count)
    turns = [queue.enter("a") for _ in range(4)]
    count[0] = 2
    turns[0].release(), turns[3].release()  # slots 1 and 2 still held: two in flight for two slots
    waiting = queue.enter("a", prefer=(3,))
    assert not waiting.granted and queue.idle_slots() == [0]
    turns[2].release()
    assert waiting.granted and waiting.slot == 0
    assert queue.claim_idle(3) is False


def test_the_scheduler_numbers_the_routes_it_is_told_and_learns_the_count_for_the_first_request():
    class Replica:
        url, ejected, slots = "http://r", False, None
        route = type("Route", (), {"name": "m", "spec": None})()

    asked = []
    routes = {name: type("Route", (), {"name": name, "replicas": [Replica()]})() for name in ("one", "many")}
    counts = SlotCounts(lambda url: asked.append(url) or {"total_slots": 2})
    scheduler = Scheduler(counts, timeout_s=60, max_per_client=64, numbered=lambda route: route.name == "one")
    first = scheduler.enter(routes["one"], "a", prefer=(1,))
    assert asked == ["http://r"] and first.slot == 1
    assert scheduler.queue_for(routes["one"]).idle_slots() == [0]
    assert scheduler.enter(routes["many"], "a", prefer=(1,)).slot is None
    assert Scheduler(counts, timeout_s=60, max_per_client=64).enter(routes["one"], "a").slot is None


def test_slot_ids_pick_prefers_free_ids_in_order_then_the_least_recently_used():
    clock = Clock()
    ids = SlotIds(clock)
    for slot in (2, 0):
        ids.take(slot)
        clock.now += 1
        ids.give_back(slot)
    assert ids.pick([0, 1, 2]) == 1  # never used
    assert ids.pick([0, 2]) == 2  # given back before 0
    assert ids.pick([0, 2], prefer=(5, 0)) == 0
    ids.take(1), ids.take(2)
    assert ids.free(3) == [0] and ids.free(2) == []  # held 2 past a shrunk count still counts


def test_under_threads_no_two_granted_turns_hold_one_slot_and_no_id_is_past_the_count():
    slots, workers, rounds = 3, 6, 100
    queue = FairQueue("m", lambda: slots, timeout_s=60.0, max_per_client=1000, numbered=lambda: True)
    holding, lock, problems, claims = set(), threading.Lock(), [], []
    requests_done = threading.Event()

    def hold(slot, who):
        with lock:
            if slot is None or not 0 <= slot < slots or slot in holding:
                problems.append(f"{who} got slot {slot} while {sorted(holding)} were held")
            holding.add(slot)
        time.sleep(0.0002)  # (holds the slot a moment, so that an overlap has a chance to show)
        with lock:
            holding.discard(slot)  # before the release: the slot may be granted at once

    def request(seed):
        rng = random.Random(seed)
        for _ in range(rounds):
            turn = queue.enter(f"c{seed % 3}", prefer=tuple(rng.sample(range(slots + 1), 2)))
            if not turn.wait(30):
                problems.append("a turn was never granted")
                return
            hold(turn.slot, "a request")
            turn.release()
            time.sleep(0.0001)  # (a gap between requests, when the saver may find a slot idle)

    def saver():
        rng = random.Random(99)
        while not requests_done.is_set():
            slot = rng.randrange(slots)
            if queue.claim_idle(slot):
                claims.append(slot)
                hold(slot, "the saver")
                queue.unclaim(slot)

    threads = [threading.Thread(target=request, args=(seed,)) for seed in range(workers)]
    saving = threading.Thread(target=saver)
    for thread in threads + [saving]:
        thread.start()
    for thread in threads:
        thread.join(60)
    requests_done.set()
    saving.join(5)
    assert not any(thread.is_alive() for thread in threads + [saving]), "a thread hung"
    assert problems == []
    assert claims, "the saver never claimed a slot: the test did not test claims"
    assert queue.in_flight == 0 and queue.depth == 0 and sorted(queue.idle_slots()) == list(range(slots))
