"""The changes a reload of the models file makes to the model pool while it runs: a model added, retired,
replaced, updated in place (service/llama/pool_changes.py), on supervisors that start and stop at the test's word."""
import threading

import pytest

from service.llama.pooled_model import ModelRemoved, PooledModel
from service.models.spec import ModelSet, ModelSpec
from service.proxy.routing import Router
from tests.fakes import FakeSupervisor
from tests.pools import Route, make_pool, use, wait_until


def kinds(events):
    """The pool's events as (kind, model, reason)."""
    return [(event.kind, event.model, event.reason) for event in events]


def test_a_model_added_while_another_serves_loads_as_start_would_have_loaded_it():
    pool, routes, events = make_pool(("a",))
    pool.start()
    busy = pool.claim(routes["a"])
    busy.wait()
    pool.add(PooledModel("b", FakeSupervisor("http://b")))  # no limits: every model is loaded, as at start
    wait_until(lambda: pool.statuses().get("b") == "loaded")
    use(pool, Route("http://b"))
    assert busy.running and pool.models["a"].supervisor.stops == 0
    busy.release()
    limited, _, _ = make_pool(("a",), max_loaded=1)
    limited.start()
    limited.add(PooledModel("c", FakeSupervisor("http://c")))  # on demand: loaded when first asked for
    assert limited.statuses() == {"a": "unloaded", "c": "unloaded"}
    use(limited, Route("http://c"))
    assert limited.statuses()["c"] == "loaded"
    with pytest.raises(ValueError):
        limited.add(PooledModel("c", FakeSupervisor("http://c2")))
    wait_until(lambda: len(events) >= 2)
    assert kinds(events) == [("load", "a", "preload"), ("load", "b", "preload")]


def test_a_retired_model_finishes_its_request_refuses_new_ones_then_stops_and_is_forgotten():
    pool, routes, events = make_pool(("a", "b"))
    pool.start()
    supervisor = pool.models["a"].supervisor
    busy = pool.claim(routes["a"])
    busy.wait()
    pool.retire("a")
    assert pool.statuses() == {"b": "loaded"} and supervisor.stops == 0  # gone from listings, still serving
    with pytest.raises(ModelRemoved) as removed:
        pool.claim(routes["a"])  # a request that found the route just before it was dropped
    assert removed.value.status == 404 and removed.value.code == "model_not_found"
    with pytest.raises(ModelRemoved):
        pool.load("a")  # the admin's too: a 404, never a KeyError
    busy.release()
    wait_until(lambda: ("unload", "a", "removed") in kinds(events))
    assert supervisor.stops == 1 and "http://a" not in pool.by_url and pool._retiring == []
    assert pool.claim(routes["a"]) is None  # forgotten: no model behind that URL any more


def test_a_removed_model_holds_its_room_until_its_llama_cpp_has_stopped():
    pool, routes, _ = make_pool(("a", "b"), max_loaded=1)
    busy = pool.claim(routes["a"])
    busy.wait()
    pool.retire("a")
    wanting = pool.claim(routes["b"])
    assert not wanting.wait(timeout=0.05) and pool.models["b"].supervisor.starts == 0
    busy.release()
    assert wanting.wait(timeout=5)
    wanting.release()
    assert pool.statuses() == {"b": "loaded"}


def test_a_request_waiting_for_a_retired_models_load_ends_with_an_error_not_a_hang():
    pool, routes, events = make_pool(("a",), max_loaded=1)
    supervisor = pool.models["a"].supervisor
    supervisor.gate = threading.Event()
    hold = pool.claim(routes["a"])
    outcome = []

    def wait():
        try:
            hold.wait()
        except ModelRemoved as error:
            outcome.append(error)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_until(lambda: supervisor.starts == 1)
    pool.retire("a")
    waiter.join(2)
    assert not waiter.is_alive() and len(outcome) == 1 and pool.models == {}
    supervisor.gate.set()  # the load under way ends: its llama.cpp is stopped at once, and the model forgotten
    wait_until(lambda: supervisor.stops == 1 and pool._retiring == [])
    wait_until(lambda: len(events) >= 2)
    assert kinds(events) == [("load", "a", "request"), ("unload", "a", "removed")]


def test_a_replaced_model_finishes_its_request_on_the_old_llama_cpp_and_serves_the_next_on_the_new():
    pool, routes, events = make_pool(("a",))
    pool.start()
    old, new = pool.models["a"].supervisor, FakeSupervisor("http://a")
    busy = pool.claim(routes["a"])
    busy.wait()
    pool.replace("a", new, ttl_s=30.0)
    late = pool.claim(routes["a"])
    assert not late.wait(timeout=0.05)  # it waits for the new llama.cpp
    assert (old.stops, new.starts) == (0, 0)  # the old one serves its request to the end
    busy.release()
    assert late.wait(timeout=5)
    assert (old.starts, old.stops, new.starts) == (1, 1, 1) and pool.models["a"].supervisor is new
    assert pool.models["a"].ttl_s == 30.0 and pool.by_url["http://a"] is pool.models["a"]
    late.release()
    old.on_state("restarting", "llama.cpp exited")  # a late word from the old supervisor no longer counts
    assert pool.statuses() == {"a": "loaded"}
    wait_until(lambda: len(events) >= 3)
    assert kinds(events) == [("load", "a", "preload"), ("unload", "a", "reload"), ("load", "a", "reload")]
    with pytest.raises(ValueError):
        pool.replace("a", FakeSupervisor("http://elsewhere"))  # routes reach it by its URL


def test_a_model_replaced_while_it_loads_serves_its_waiter_on_the_new_llama_cpp():
    pool, routes, _ = make_pool(("a",), max_loaded=1)
    old, new = pool.models["a"].supervisor, FakeSupervisor("http://a")
    old.gate = threading.Event()
    hold = pool.claim(routes["a"])
    wait_until(lambda: old.starts == 1)
    pool.replace("a", new)
    old.gate.set()
    assert hold.wait(timeout=5)
    assert (old.stops, new.starts) == (1, 1) and pool.models["a"].supervisor is new
    hold.release()


def test_an_unloaded_model_just_takes_its_new_supervisor():
    pool, routes, events = make_pool(("a",), max_loaded=1)
    old, new = pool.models["a"].supervisor, FakeSupervisor("http://a")
    pool.replace("a", new, pinned=True)
    assert pool.models["a"].supervisor is new and pool.models["a"].pinned and pool.statuses() == {"a": "unloaded"}
    use(pool, routes["a"])
    assert (old.starts, old.stops, new.starts) == (0, 0, 1)
    assert kinds(events) == [("load", "a", "request")]


def test_a_model_draining_for_room_when_replaced_comes_back_on_its_new_llama_cpp():
    pool, routes, _ = make_pool(("a", "b"), max_loaded=1)
    busy = pool.claim(routes["a"])
    busy.wait()
    wanting = pool.claim(routes["b"])  # a drains to make room for b
    new = FakeSupervisor("http://a")
    pool.replace("a", new)
    wanting.release()  # b's client gives up: a would serve again, but not on its old llama.cpp
    busy.release()
    wait_until(lambda: pool.statuses()["a"] == "loaded" and new.starts == 1)
    assert pool.models["b"].supervisor.starts == 0


@pytest.mark.parametrize("change", ["retire", "replace", "unload"])
def test_a_crashed_model_drained_while_busy_stops_once_idle_even_when_its_restart_fails(change):
    # A failed restart must not turn "draining" into "failed": only a draining model is ever unloaded, and its
    # unload is what ends the supervisor's tries.
    pool, routes, events = make_pool(("a",))
    pool.start()
    old, new = pool.models["a"].supervisor, FakeSupervisor("http://a")
    busy = pool.claim(routes["a"])
    busy.wait()
    old.on_state("restarting", "llama.cpp exited with code -9")
    if change == "retire":
        pool.retire("a")
    elif change == "replace":
        pool.replace("a", new)
    else:
        old.on_state("failed", "llama.cpp did not become ready")  # an unload waits for a restart under way
        threading.Thread(target=pool.unload, args=("a",), daemon=True).start()
        wait_until(lambda: pool.models["a"].state == "draining")
    old.on_state("failed", "llama.cpp did not become ready")  # the supervisor tried (again) and failed
    busy.release()
    wait_until(lambda: old.stops == 1)
    if change == "retire":
        wait_until(lambda: pool._retiring == [] and "http://a" not in pool.by_url)
    elif change == "replace":
        wait_until(lambda: pool.statuses() == {"a": "loaded"})
        assert pool.models["a"].supervisor is new and new.starts == 1 and pool.models["a"].pending is None
    else:
        wait_until(lambda: pool.statuses() == {"a": "unloaded"})


def test_a_request_that_found_its_route_just_before_a_reload_removed_it_gets_404_not_a_dead_url():
    pool, _, _ = make_pool(("a", "b"), max_loaded=1)
    pool.start()
    router = Router.from_models(ModelSet((ModelSpec("a", source="/m/a.gguf"), ModelSpec("b", source="/m/b.gguf"))),
                                {"a": "http://a", "b": "http://b"})
    route = router.route("a")
    router.apply(ModelSet((ModelSpec("b", source="/m/b.gguf"),)), {"b": "http://b"})  # as a reload does: routes,
    pool.retire("a")  # then the pool, which forgets a model at rest at once
    assert route.removed and not router.route("b").removed
    with pytest.raises(ModelRemoved) as removed:
        pool.claim(route)
    assert removed.value.status == 404 and "'a'" in removed.value.message


@pytest.mark.parametrize("options, settings, loads", [
    ({"max_loaded": 1}, {"preload": True}, True),  # preload=on: loaded at start, so loaded now
    ({}, {}, True),  # no limits: every model loads at start
    ({"max_loaded": 1}, {}, False),  # on demand: on its first request
])
def test_a_model_at_rest_given_a_new_command_line_loads_where_start_would_have_loaded_it(options, settings, loads):
    pool, routes, _ = make_pool(("a",), **options)
    pool.start()
    pool.unload("a")  # at rest: it takes its new supervisor at once
    new = FakeSupervisor("http://a")
    pool.replace("a", new, **settings)
    if loads:
        wait_until(lambda: pool.statuses() == {"a": "loaded"})
    assert pool.models["a"].supervisor is new and new.starts == int(loads)
    assert pool.statuses() == {"a": "loaded" if loads else "unloaded"}


def test_settings_that_need_no_restart_change_in_place():
    pool, routes, events = make_pool(("a", "b"), max_loaded=1, a_options={"pinned": True, "preload": True})
    pool.start()
    try:
        pool.update("a", pinned=False)  # b may now take a's room
        use(pool, routes["b"])
        assert pool.statuses() == {"a": "unloaded", "b": "loaded"}
        pool.update("b", ttl_s=0.1)  # no model had a TTL at start: the idle check begins now
        wait_until(lambda: pool.statuses()["b"] == "unloaded")
        assert pool.models["b"].supervisor.starts == 1
        with pytest.raises(TypeError, match="ctx"):
            pool.update("b", ctx=4096)  # a new command line is a replace
        wait_until(lambda: len(events) >= 4)
        assert kinds(events)[1:] == [("unload", "a", "lru"), ("load", "b", "request"), ("unload", "b", "idle")]
    finally:
        pool.stop()
