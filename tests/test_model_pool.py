"""The model pool's rules, on supervisors that start and stop at the test's word: one load however many wait,
least recently used first, busy models waited for and never cut, failures backed off, budgets and pins."""
import threading
import time

import pytest

from service.llama.pooled_model import LOADED, ModelLoadFailed, ModelLoadTimeout
from service.models.errors import LlamaStartError
from tests.pools import Route, make_pool, use, wait_until


def test_nothing_loads_until_asked_and_a_route_the_gateway_does_not_run_gets_no_hold():
    pool, routes, _ = make_pool(max_loaded=1)
    pool.start()
    assert pool.statuses() == {"a": "unloaded", "b": "unloaded", "c": "unloaded"}
    assert pool.claim(Route("http://elsewhere")) is None
    use(pool, routes["a"])
    assert pool.statuses()["a"] == "loaded" and pool.models["a"].supervisor.starts == 1


def test_without_a_limit_every_model_loads_at_start():
    pool, _, events = make_pool()
    pool.start()
    assert set(pool.statuses().values()) == {"loaded"}
    assert [(event.kind, event.reason) for event in events] == [("load", "preload")] * 3


# With room for two, a model already loading would fit beside itself: only its state keeps a second load away.
@pytest.mark.parametrize("max_loaded", [1, 2])
def test_concurrent_first_requests_start_exactly_one_load(max_loaded):
    pool, routes, events = make_pool(max_loaded=max_loaded)
    supervisor = pool.models["a"].supervisor
    supervisor.gate = threading.Event()
    holds = [pool.claim(routes["a"]) for _ in range(6)]
    results = []
    waiters = [threading.Thread(target=lambda hold=hold: results.append(hold.wait())) for hold in holds]
    for waiter in waiters:
        waiter.start()
    wait_until(lambda: supervisor.starts >= 1)
    assert pool.statuses()["a"] == "loading" and supervisor.starts == 1
    supervisor.gate.set()
    for waiter in waiters:
        waiter.join(5)
    assert results == [True] * 6 and supervisor.starts == 1
    assert pool.models["a"].running == 6
    for hold in holds:
        hold.release()
        hold.release()  # a second release does nothing
    assert pool.models["a"].running == 0 and [event.kind for event in events] == ["load"]


def test_least_recently_used_idle_model_makes_room():
    pool, routes, events = make_pool(max_loaded=2)
    use(pool, routes["a"])
    use(pool, routes["b"])
    use(pool, routes["a"])  # b is now the least recently used
    use(pool, routes["c"])
    assert pool.statuses() == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    assert [(event.kind, event.model, event.reason) for event in events if event.kind == "unload"] == [
        ("unload", "b", "lru")]


def test_a_busy_model_is_waited_for_never_cut_and_takes_no_new_requests_meanwhile():
    pool, routes, _ = make_pool(max_loaded=1)
    busy = pool.claim(routes["a"])
    busy.wait()
    wanting = pool.claim(routes["b"])
    assert not wanting.wait(timeout=0.05)  # a is busy: b waits
    assert pool.models["a"].supervisor.stops == 0
    # a is draining now: a new request for a waits behind b instead of keeping a busy forever
    late = pool.claim(routes["a"])
    assert not late.wait(timeout=0.05)
    busy.release()
    assert wanting.wait(timeout=5)
    assert pool.models["a"].supervisor.stops == 1 and pool.statuses()["b"] == "loaded"
    wanting.release()
    assert late.wait(timeout=5)  # and then a comes back, b making room
    assert pool.statuses() == {"a": "loaded", "b": "unloaded", "c": "unloaded"}
    late.release()


def test_a_failed_load_answers_503_with_the_reason_backs_off_and_leaves_others_alone():
    pool, routes, events = make_pool(max_loaded=2)
    pool.models["a"].supervisor.fail_with = "llama.cpp exited with code 1 while starting; its last lines:\nbad magic"
    hold = pool.claim(routes["a"])
    with pytest.raises(ModelLoadFailed) as failed:
        hold.wait()
    assert "bad magic" in failed.value.message and failed.value.code == "model_load_failed"
    assert failed.value.status == 503 and int(failed.value.headers["Retry-After"]) >= 1
    hold.release()  # nothing more to let go of
    assert pool.statuses()["a"] == "failed" and pool.models["a"].waiting == 0
    with pytest.raises(ModelLoadFailed):
        pool.claim(routes["a"])  # within the backoff: at once, no new load
    assert pool.models["a"].supervisor.starts == 1
    # The pool tells its listeners after its lock is let go: the failure's event may come just after the raise.
    wait_until(lambda: any(event.model == "a" and not event.ok for event in events))
    use(pool, routes["b"])
    assert pool.statuses()["b"] == "loaded"
    pool.models["a"].retry_at = 0  # the backoff has passed
    pool.models["a"].supervisor.fail_with = None
    use(pool, routes["a"])
    assert pool.statuses()["a"] == "loaded"
    assert [(event.model, event.ok) for event in events if event.kind == "load"] == [
        ("a", False), ("b", True), ("a", True)]


def test_a_load_that_takes_too_long_times_out_for_its_waiters_but_goes_on():
    pool, routes, _ = make_pool(max_loaded=1, load_timeout_s=0.2)
    supervisor = pool.models["a"].supervisor
    supervisor.gate = threading.Event()
    hold = pool.claim(routes["a"])
    with pytest.raises(ModelLoadTimeout) as timed_out:
        hold.wait()
    assert timed_out.value.code == "model_load_timeout" and pool.models["a"].waiting == 0
    supervisor.gate.set()
    wait_until(lambda: pool.statuses()["a"] == LOADED)


def test_memory_budget_unloads_enough_and_refuses_a_model_that_cannot_fit_alone():
    pool, routes, events = make_pool(("a", "b", "c", "huge"), memory_mib=1000, a_options={"need_mib": 600},
                                     b_options={"need_mib": 300}, c_options={"need_mib": 500},
                                     huge_options={"need_mib": 4000})
    use(pool, routes["a"])
    use(pool, routes["b"])
    use(pool, routes["c"])  # 600 + 300 + 500 > 1000: a (least recently used) goes
    assert pool.statuses() == {"a": "unloaded", "b": "loaded", "c": "loaded", "huge": "failed"}
    assert [event.reason for event in events if event.kind == "unload"] == ["memory"]
    with pytest.raises(ModelLoadFailed, match="MODELS_MEMORY_MIB=1000"):
        pool.claim(routes["huge"])


def test_pinned_models_stay_and_a_model_with_no_room_is_refused():
    pool, routes, _ = make_pool(("a", "b"), max_loaded=1, a_options={"pinned": True, "preload": True})
    pool.start()
    hold = pool.claim(routes["b"])
    with pytest.raises(ModelLoadFailed, match="pinned"):
        hold.wait()
    assert pool.statuses() == {"a": "loaded", "b": "failed"}


def test_the_least_recently_used_model_makes_room_unless_it_is_pinned():
    pool, routes, events = make_pool(max_loaded=2, a_options={"pinned": True, "preload": True})
    pool.start()  # a, pinned, is loaded first: the least recently used from here on
    use(pool, routes["b"])
    use(pool, routes["c"])
    assert pool.statuses() == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    assert pool.models["a"].supervisor.stops == 0
    assert [(event.model, event.reason) for event in events if event.kind == "unload"] == [("b", "lru")]


def test_more_preloaded_models_than_the_limit_stop_the_start():
    pool, _, _ = make_pool(("a", "b"), max_loaded=1, a_options={"preload": True}, b_options={"preload": True})
    with pytest.raises(LlamaStartError, match="MODELS_MAX_LOADED=1"):
        pool.start()


def test_an_idle_model_is_unloaded_after_its_ttl_and_loads_again_when_asked():
    # b is pinned, idle, and its TTL is the shorter: were it given one, it would be gone before a.
    pool, routes, events = make_pool(("a", "b"), a_options={"ttl_s": 0.2, "preload": True},
                                     b_options={"ttl_s": 0.1, "pinned": True})
    pool.start()
    try:
        wait_until(lambda: any(event.kind == "unload" for event in events))  # told once it is unloaded
        assert pool.models["b"].state == LOADED and pool.models["b"].supervisor.stops == 0  # pinned: it stays
        assert pool.statuses() == {"a": "unloaded", "b": "loaded"}
        assert [(event.model, event.reason) for event in events if event.kind == "unload"] == [("a", "idle")]
        use(pool, routes["a"])
        assert pool.models["a"].supervisor.starts == 2
    finally:
        pool.stop()


def test_admin_load_and_unload_wait_for_the_outcome():
    pool, routes, events = make_pool(("a",), max_loaded=1)
    assert pool.load("a") == "loaded"
    busy = pool.claim(routes["a"])
    threading.Timer(0.1, busy.release).start()
    assert pool.unload("a") == "unloaded"  # once its request had ended
    wait_until(lambda: len(events) >= 2)  # the unload is told just after its state changes
    assert [(event.kind, event.reason) for event in events] == [("load", "admin"), ("unload", "admin")]


def test_an_admin_unload_takes_over_a_drain_whose_requester_gives_up():
    # Issue 25: a drains to make room for b; the admin unloads a; b's client leaves. a must still go once its
    # request ends, and the admin's answer must say it is on its way, not "loaded".
    pool, routes, events = make_pool(("a", "b"), max_loaded=1, load_timeout_s=0.2)
    busy = pool.claim(routes["a"])
    busy.wait()
    wanting = pool.claim(routes["b"])
    assert pool.models["a"].state == "draining"
    assert pool.unload("a") == "draining"  # a's request outlasts the admin's wait: the unload goes on
    wanting.release()  # b's client gave up: a's room is no longer needed, but the admin still wants it gone
    assert pool.models["a"].state == "draining"
    pool.load_timeout = 5.0  # the admin's short wait is over; the load below may take its time
    late = pool.claim(routes["a"])  # a new request waits for a's reload instead of keeping it loaded
    assert not late.wait(timeout=0.05)
    busy.release()
    assert late.wait(timeout=5)
    late.release()
    assert pool.models["a"].supervisor.stops == 1 and pool.models["b"].supervisor.starts == 0
    wait_until(lambda: len(events) >= 3)  # an event is told just after the state changes
    assert [(event.kind, event.model, event.reason) for event in events] == [
        ("load", "a", "request"), ("unload", "a", "admin"), ("load", "a", "request")]


def test_an_admin_unload_of_a_draining_model_waits_for_its_requests():
    pool, routes, events = make_pool(("a", "b"), max_loaded=1)
    busy = pool.claim(routes["a"])
    busy.wait()
    wanting = pool.claim(routes["b"])
    threading.Timer(0.1, busy.release).start()
    assert pool.unload("a") == "unloaded"
    assert wanting.wait(timeout=5) and pool.statuses() == {"a": "unloaded", "b": "loaded"}
    wanting.release()
    wait_until(lambda: any(event.kind == "unload" for event in events))  # told just after the state changes
    assert [(event.kind, event.model, event.reason) for event in events if event.kind == "unload"] == [
        ("unload", "a", "admin")]


def test_requests_wait_while_a_crashed_model_restarts():
    pool, routes, _ = make_pool(("a",))
    pool.start()
    supervisor = pool.models["a"].supervisor
    supervisor.on_state("restarting", "llama.cpp exited with code -9")
    hold = pool.claim(routes["a"])
    assert not hold.wait(timeout=0.05) and pool.statuses()["a"] == "loading"
    supervisor.on_state("ready", None)
    assert hold.wait(timeout=1)
    hold.release()
    supervisor.on_state("restarting", "llama.cpp exited with code -9")
    hold = pool.claim(routes["a"])
    supervisor.on_state("failed", "llama.cpp did not become ready")
    with pytest.raises(ModelLoadFailed, match="did not become ready"):
        hold.wait()
    with pytest.raises(ModelLoadFailed):
        pool.claim(routes["a"])  # failed while its supervisor keeps trying: at once
    supervisor.on_state("ready", None)
    use(pool, routes["a"])


def test_a_request_sent_as_its_llama_cpp_died_waits_for_the_restart_to_be_sent_again():
    pool, routes, _ = make_pool(("a",))
    pool.start()
    supervisor = pool.models["a"].supervisor
    hold = pool.claim(routes["a"])
    assert hold.wait(timeout=0)
    assert not hold.wait_for_restart()  # llama.cpp is not restarting: the failure stands
    supervisor.on_state("restarting", "llama.cpp exited with code -9")
    threading.Timer(0.05, supervisor.on_state, ("ready", None)).start()
    assert hold.wait_for_restart() and hold.running
    assert (pool.models["a"].running, pool.models["a"].waiting) == (1, 0)
    hold.release()
    assert (pool.models["a"].running, pool.models["a"].waiting) == (0, 0)


def test_a_model_already_loaded_is_not_wanted_again_once_unloaded():
    pool, routes, events = make_pool(("a", "b"), max_loaded=1)
    pool.load("a")
    pool.load("a", reason="admin")  # already loaded: nothing to plan
    use(pool, routes["b"])  # a makes room, and stays unloaded
    assert pool.statuses() == {"a": "unloaded", "b": "loaded"}
    assert [(event.kind, event.model) for event in events] == [("load", "a"), ("unload", "a"), ("load", "b")]


def test_a_request_during_a_crash_restart_does_not_reload_the_model_after_an_idle_unload():
    pool, routes, events = make_pool(("a",), a_options={"ttl_s": 0.2, "preload": True})
    pool.start()
    supervisor = pool.models["a"].supervisor
    try:
        supervisor.on_state("restarting", "llama.cpp exited with code -9")
        hold = pool.claim(routes["a"])
        supervisor.on_state("ready", None)
        assert hold.wait(1)
        hold.release()
        wait_until(lambda: pool.statuses()["a"] == "unloaded")
        time.sleep(0.1)  # time for a wrong reload to begin
        assert pool.statuses()["a"] == "unloaded" and supervisor.starts == 1
    finally:
        pool.stop()


def test_a_model_drained_for_a_request_that_gave_up_serves_again():
    pool, routes, _ = make_pool(("a", "b"), max_loaded=1)
    busy = pool.claim(routes["a"])
    busy.wait()
    wanting = pool.claim(routes["b"])
    assert pool.models["a"].state == "draining"
    late = pool.claim(routes["a"])
    assert not late.wait(timeout=0.05)
    wanting.release()  # b's client gave up: a's room is not needed
    assert late.wait(timeout=1) and pool.models["a"].state == "loaded"
    busy.release(), late.release()
    assert pool.models["a"].supervisor.stops == 0 and pool.models["b"].supervisor.starts == 0


def test_a_waiter_whose_client_left_lets_go_at_once():
    from service.errors import ClientClosedRequest

    pool, routes, _ = make_pool(("a",), max_loaded=1)
    pool.models["a"].supervisor.gate = threading.Event()
    hold = pool.claim(routes["a"])
    with pytest.raises(ClientClosedRequest):
        hold.wait(None, gone=lambda: True)
    assert pool.models["a"].waiting == 0 and pool.models["a"].wanted_since is None
    pool.models["a"].supervisor.gate.set()


def test_a_model_that_cannot_fit_beside_pinned_ones_is_refused_at_once():
    pool, routes, events = make_pool(("p", "a", "c"), memory_mib=16000,
                                     p_options={"need_mib": 8000, "pinned": True, "preload": True},
                                     a_options={"need_mib": 4000}, c_options={"need_mib": 10000})
    pool.start()
    use(pool, routes["a"])
    hold = pool.claim(routes["c"])
    with pytest.raises(ModelLoadFailed, match="no room beside the pinned models"):
        hold.wait()
    assert pool.statuses() == {"p": "loaded", "a": "loaded", "c": "failed"}  # a was not unloaded for nothing
    assert [(event.model, event.ok) for event in events if event.kind == "load"][-1] == ("c", False)


def test_a_crashed_model_whose_restart_fails_still_counts_against_the_limit():
    pool, routes, _ = make_pool(("a", "b"), max_loaded=1, a_options={"preload": True})
    pool.start()
    supervisor = pool.models["a"].supervisor
    supervisor.on_state("restarting", "llama.cpp exited with code -9")
    supervisor.on_state("failed", "llama.cpp did not become ready")
    use(pool, routes["b"])  # a's restarts are stopped to make room
    assert supervisor.stops == 1 and pool.statuses() == {"a": "unloaded", "b": "loaded"}


def test_a_model_that_cannot_even_start_its_process_stops_the_start_naming_it():
    pool, _, _ = make_pool(("a", "b"))
    pool.models["b"].supervisor.start = lambda: (_ for _ in ()).throw(PermissionError("not executable"))
    with pytest.raises(LlamaStartError, match="model b: not executable"):
        pool.start()
    assert pool.models["a"].supervisor.stops >= 1


def test_a_memory_budget_loads_on_demand_and_checks_the_preloaded_models():
    pool, _, _ = make_pool(("a", "b"), memory_mib=1000, a_options={"need_mib": 600})
    pool.start()
    assert pool.statuses() == {"a": "unloaded", "b": "unloaded"}
    pool, _, _ = make_pool(("a", "b"), memory_mib=1000, a_options={"need_mib": 600, "preload": True},
                           b_options={"need_mib": 600, "preload": True})
    with pytest.raises(LlamaStartError, match="MODELS_MEMORY_MIB=1000"):
        pool.start()

