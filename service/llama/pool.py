"""Models on demand: the local models' llama.cpp processes, loaded by the first request that names them and
unloaded when idle too long or to make room for another (the least recently used idle one).

Each model has one state, changed only under the pool's lock:
    unloaded -> loading -> loaded -> draining -> unloading -> unloaded
A load or an unload runs in a thread of its own, so that a request that gives up waiting never cuts one short.
A request holds its model (a Hold) from the moment it names it until its answer has been sent: a held model is
never unloaded, and "draining" (chosen to make room) takes no new requests, so that a model waiting for room is
never starved by a busy one. A load that fails leaves the model "failed" until a backoff has passed.
A loaded model whose llama.cpp dies is restarted by its supervisor; requests that arrive meanwhile wait for it.
A reload adds, removes, replaces or updates models while the pool runs (pool_changes.py), through these states.
"""
import logging
import threading
import time

from ..errors import ClientClosedRequest
from ..models.errors import LlamaStartError
from .pooled_model import (DRAINING, FAILED, LOAD_RETRY_MAX_S, LOAD_RETRY_S, LOADED, LOADING, UNLOADED,
                           UNLOADING, Hold, ModelEvent, ModelLoadFailed, ModelLoadTimeout, ModelRemoved,
                           load_failure, start_together)
from .pool_changes import LiveChanges
from .room import Room

log = logging.getLogger(__name__)

# How long a request that found its llama.cpp gone waits for the supervisor to notice (it notices at once).
RESTART_NOTICE_S = 0.5
# How often a request waiting for a load checks whether its client is still there.
GONE_CHECK_S = 0.25
# How often idle models are looked for, at most (a TTL shorter than this is checked this often).
IDLE_CHECK_S = 1.0


class ModelPool(LiveChanges):
    """The local models, loaded and unloaded on demand within MODELS_MAX_LOADED and MODELS_MEMORY_MIB."""

    def __init__(self, models, *, max_loaded=0, memory_mib=None, load_timeout_s=300.0, clock=time.monotonic):
        self.models = {}
        self.by_url = {}
        self._retiring = []  # models a reload removed, until their llama.cpp has stopped: they still hold room
        self._started = False
        self.max_loaded = max_loaded
        self.memory_mib = memory_mib
        self.room = Room(max_loaded, memory_mib)
        self.load_timeout = load_timeout_s
        self.clock = clock
        self.listeners = []  # called with each ModelEvent (metrics)
        self.before_stop = []  # called with a model about to stop while it serves (warm conversations save then)
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._reaper = None
        self._workers = set()  # the load and unload threads (stop() waits for them)
        for model in models:
            self._join(model)

    # -- what the gateway asks -------------------------------------------------------------------------------

    def model_named(self, name):
        """The pooled model of that name, or None (a model the gateway does not run)."""
        return self.models.get(name)

    def model_for(self, route):
        """The pooled model behind a route (one of its replicas is a local llama.cpp), or None."""
        for replica in route.replicas:
            model = self.by_url.get(replica.url)
            if model is not None:
                return model
        return None

    def claim(self, route):
        """Hold route's local model for one request (starting its load if it is not loaded); None for a route to
        llama-servers the gateway does not run. Raise ModelLoadFailed at once while a failed load backs off, and
        ModelRemoved for a route a reload removed (its model may be forgotten already: no hold would keep it)."""
        model = self.model_for(route)
        if route.removed:  # read after the model: the router marks it before the pool retires the model
            raise ModelRemoved(route.name or route.spec.id)
        if model is None:
            return None
        with self._changed:
            now = self.clock()
            if model.removed:
                raise ModelRemoved(model.name)  # its route was looked up just before a reload removed it
            if model.state == FAILED and now < model.retry_at:
                raise ModelLoadFailed(model.name, model.failure, model.retry_at - now)
            hold = Hold(self, model, model.failed_loads, now + self.load_timeout)
            if model.state == LOADED:
                model.running += 1
                model.last_used = now
                hold.running = True
            else:
                model.waiting += 1
                self._want(model, "request")
                self._plan()
        return hold

    def statuses(self) -> dict:
        """Each model's status: loaded, loading, unloaded or failed."""
        with self._changed:
            return {name: model.status for name, model in self.models.items()}

    # -- start and stop --------------------------------------------------------------------------------------

    def start(self):
        """Load the models that are loaded at start (all of them without MODELS_MAX_LOADED, else those with
        preload=on) side by side and wait for them; raise LlamaStartError if one fails. Then watch for idle ones."""
        first = [model for model in self.models.values() if model.state != FAILED
                 and (model.preload or not self._on_demand())]
        if self.max_loaded and len(first) > self.max_loaded:
            raise LlamaStartError(f"{len(first)} models have preload=on, more than MODELS_MAX_LOADED="
                                  f"{self.max_loaded}")
        need = sum(model.need_mib or 0 for model in first)
        if self.memory_mib and need > self.memory_mib:
            raise LlamaStartError(f"the models with preload=on need about {need:,.0f} MiB, more than "
                                  f"MODELS_MEMORY_MIB={self.memory_mib}")
        started = self.clock()
        start_together(first)
        with self._changed:
            for model in first:
                model.state, model.last_used = LOADED, self.clock()
            self._started = True
        for model in first:
            self._emit(ModelEvent("load", model.name, "preload", self.clock() - started))
        self._watch_idle()
        return self

    def stop(self):
        """Stop every llama.cpp (a load under way included) and the idle check."""
        self._stopping.set()
        with self._changed:
            models = self._everyone()
            serving = [model for model in models if model.state in (LOADED, DRAINING)]
            for model in models:
                model.state = UNLOADED
            self._changed.notify_all()
        for model in serving:
            self._before_stop(model)
        for model in models:
            model.supervisor.stop()
        # A load that began just before may have started its llama.cpp after the stop above: wait, stop again.
        with self._changed:
            workers = list(self._workers)
        for worker in workers:
            worker.join(10)
        for model in models:
            model.supervisor.stop()  # a replaced model's new supervisor included

    # -- the state machine, under the lock -------------------------------------------------------------------

    def _wait(self, hold, timeout, gone=None):
        model = hold.model
        with self._changed:
            limit = hold._deadline if timeout is None else min(hold._deadline, self.clock() + timeout)
            while not hold.running:
                if hold.released:
                    raise RuntimeError("waiting on a released hold")
                if model.removed:
                    self._let_go(hold)
                    raise ModelRemoved(model.name)
                if model.state == LOADED:
                    model.waiting -= 1
                    model.running += 1
                    model.last_used = self.clock()
                    hold.running = True
                    break
                if model.failed_loads > hold._failed_loads or self._stopping.is_set():
                    self._let_go(hold)
                    raise ModelLoadFailed(model.name, model.failure or "the gateway is stopping",
                                          max(0.0, model.retry_at - self.clock()))
                if gone is not None and gone():
                    self._let_go(hold)  # its client left: it wants the model no more
                    raise ClientClosedRequest()
                left = limit - self.clock()
                if left <= 0:
                    if limit < hold._deadline:
                        return False  # the caller's own timeout: it may wait again
                    self._let_go(hold)
                    raise ModelLoadTimeout(model.name, self.load_timeout)
                self._changed.wait(min(left, GONE_CHECK_S) if gone is not None else left)
            return True

    def _wait_for_restart(self, hold, gone=None) -> bool:
        model = hold.model
        with self._changed:
            if hold.running and model.state == LOADED:
                # A request may find its llama.cpp gone a moment before the supervisor does.
                self._changed.wait_for(lambda: model.state != LOADED, RESTART_NOTICE_S)
            if not hold.running or not model.restarting or model.state != LOADING:
                return False
            model.running -= 1
            model.waiting += 1
            hold.running = False
            hold._failed_loads, hold._deadline = model.failed_loads, self.clock() + self.load_timeout
        return self._wait(hold, None, gone)

    def _release(self, hold):
        with self._changed:
            if hold.released:
                return
            if hold.running:
                hold.model.running -= 1
                hold.model.last_used = self.clock()
                hold.released = True
                self._plan()
                self._changed.notify_all()
            else:
                self._let_go(hold)

    def _let_go(self, hold):
        hold.released = True
        hold.model.waiting -= 1
        if hold.model.waiting == 0:
            hold.model.wanted_since = hold.model.wanted_by = None  # nobody waits any more: no load to start for it
        self._plan()
        self._changed.notify_all()

    def _want(self, model, reason):
        """Note that someone waits for model to be loaded (a load is planned only for an unloaded model: one
        loading, or draining, gets there by itself)."""
        if model.state in (UNLOADED, FAILED) and model.wanted_since is None:
            model.wanted_since, model.wanted_by = self.clock(), reason

    def _plan(self):
        """Start what the states call for: load wanted models that fit, choose what to unload to make room for
        the first that does not (those behind it wait their turn), give models chosen for room that is no longer
        needed back their requests, and unload drained models."""
        now = self.clock()
        wanted = sorted((model for model in self.models.values()
                         if model.wanted_since is not None and model.state in (UNLOADED, FAILED)
                         and model.retry_at <= now), key=lambda model: model.wanted_since)
        if not wanted:
            self._undrain()
        for model in wanted:
            shortfall = self.room.shortfall(model, self._everyone())
            if shortfall is None:
                self._begin(model, LOADING, self._load_now, model.wanted_by or "request")
                continue
            self._make_room(model, *shortfall)
            break
        for model in self._everyone():
            if model.state == DRAINING and model.running == 0:
                self._begin(model, UNLOADING, self._unload_now, model.unload_reason)

    def _make_room(self, model, extra_models, extra_mib):
        """Drain the models chosen to make room (room.py); refuse the model at once when nothing could."""
        if self.room.never_fits(model, self._everyone()):
            self._refuse(model, "no room beside the pinned models (MODEL_SETTINGS pin=on); raise MODELS_MAX_LOADED "
                                "or MODELS_MEMORY_MIB")
            return
        victims, reason = self.room.victims(self._everyone(), extra_models, extra_mib)
        for victim in victims:
            self._drain(victim, reason)

    def _undrain(self):
        """Models chosen to make room that nobody needs any more (its requester gave up): back to serving."""
        for model in self.models.values():
            if model.state == DRAINING and model.unload_reason in ("lru", "memory") and not model.restarting:
                if model.pending is not None:
                    model.unload_reason = "reload"  # replaced meanwhile: it serves again on its new llama.cpp
                    continue
                model.state, model.unload_reason = LOADED, None
                self._changed.notify_all()  # requests that came meanwhile wait for it

    def _refuse(self, model, reason):
        model.state, model.failure = FAILED, reason
        model.failed_loads += 1
        model.retry_at = self.clock() + LOAD_RETRY_S
        model.wanted_since = model.wanted_by = None
        self._changed.notify_all()
        self._emit(ModelEvent("load", model.name, "request", 0.0, ok=False, error=reason))

    def _drain(self, model, reason):
        model.state, model.unload_reason = DRAINING, reason

    def _begin(self, model, state, work, reason):
        model.state = state
        worker = threading.Thread(target=work, args=(model, reason), name=f"model-{state}", daemon=True)
        self._workers.add(worker)
        worker.start()

    # -- the work, outside the lock --------------------------------------------------------------------------

    def _load_now(self, model, reason):
        started = self.clock()
        error = None
        try:
            if self._stopping.is_set():
                raise LlamaStartError("the gateway is stopping")
            model.supervisor.start()
        except Exception as failure:  # noqa: BLE001 - whatever stops a load is its failure, told to its requests
            error = load_failure(failure)
        took = self.clock() - started
        with self._changed:
            model.wanted_since = model.wanted_by = None
            self._workers.discard(threading.current_thread())
            if self._stopping.is_set():
                model.state = UNLOADED
            elif model.removed or model.pending is not None:
                self._loaded_meanwhile(model, error is None)
            elif error is None:
                model.state, model.last_used, model.failures_in_row = LOADED, self.clock(), 0
            else:
                model.state, model.failure = FAILED, error
                model.failed_loads += 1
                model.failures_in_row += 1
                model.retry_at = self.clock() + min(LOAD_RETRY_S * 2 ** (model.failures_in_row - 1),
                                                    LOAD_RETRY_MAX_S)
            self._plan()
            self._changed.notify_all()
        self._emit(ModelEvent("load", model.name, reason, took, ok=error is None, error=error))

    def _unload_now(self, model, reason):
        started = self.clock()
        self._before_stop(model)
        model.supervisor.stop()
        with self._changed:
            self._workers.discard(threading.current_thread())
            model.state, model.unload_reason, model.restarting, model.retry_at = UNLOADED, None, False, 0.0
            self._after_unload(model, reason)  # forgotten, replaced, or loaded again for requests that came
            self._plan()
            self._changed.notify_all()
        self._emit(ModelEvent("unload", model.name, reason, self.clock() - started))

    def _before_stop(self, model):
        # An unload after its drain, or the gateway's stop: its requests are done. Each hook returns soon.
        for hook in self.before_stop:
            try:
                hook(model)
            except Exception:  # noqa: BLE001 - what a hook failed to do must not keep the model loaded
                log.exception("a hook before a model's stop failed", extra={"fields": {"model": model.name}})

    def _listen(self, model, supervisor):
        supervisor.on_state = lambda state, detail: self._supervisor_said(model, state, detail, supervisor)

    def _supervisor_said(self, model, state, detail, supervisor):
        """A supervisor's word on a llama.cpp that died: "restarting", then "ready" or "failed"."""
        with self._changed:
            if supervisor is not model.supervisor:
                return  # one a reload replaced, stopped late: its llama.cpp is no longer the model's
            if state == "restarting" and model.state in (LOADED, DRAINING):
                model.restarting = True  # a model draining goes on to its unload, which ends the restarts
                if model.state == LOADED:
                    model.state = LOADING
            elif state == "ready" and model.state == DRAINING:
                model.restarting = False
            elif state == "ready" and model.restarting and model.state in (LOADING, FAILED):
                model.state, model.restarting, model.last_used, model.retry_at = LOADED, False, self.clock(), 0.0
                model.wanted_since = model.wanted_by = None
            elif state == "failed" and model.restarting and model.state in (LOADING, FAILED):
                # The supervisor keeps trying on its own; until it succeeds, requests fail at once. A model draining
                # (retired, replaced, unloaded) stays so: its unload is what stops those tries.
                model.state, model.failure, model.retry_at = FAILED, detail, float("inf")
                model.failed_loads += 1
            self._changed.notify_all()
        if state in ("ready", "failed"):
            self._emit(ModelEvent("load", model.name, "restart", 0.0, ok=state == "ready", error=detail))

    def _ttl(self, model) -> float:
        return 0.0 if model.pinned else model.ttl_s

    def _on_demand(self) -> bool:
        # With a limit (a count or a memory budget), only preloaded models load at start (or when added).
        return bool(self.max_loaded or self.memory_mib)

    def _everyone(self) -> list:
        """The models that may hold a llama.cpp: the pool's, and those a reload removed that have yet to stop."""
        return [*self.models.values(), *self._retiring]

    def _watch_idle(self):
        """Start the idle check once a model has a TTL (at start, or once a reload gives one)."""
        with self._changed:
            if (self._reaper is not None or not self._started or self._stopping.is_set()
                    or not any(self._ttl(model) for model in self.models.values())):
                return
            self._reaper = threading.Thread(target=self._reap_idle, name="model-idle-check", daemon=True)
            self._reaper.start()

    def _idle_period(self) -> float:
        with self._changed:  # a reload may have changed the TTLs
            return min([IDLE_CHECK_S] + [self._ttl(model) / 4 for model in self.models.values() if self._ttl(model)])

    def _reap_idle(self):
        while not self._stopping.wait(self._idle_period()):
            with self._changed:
                now = self.clock()
                for model in self.models.values():
                    ttl = self._ttl(model)
                    if (ttl and model.state == LOADED and model.running == 0 and model.waiting == 0
                            and now - model.last_used >= ttl):
                        self._drain(model, "idle")
                self._plan()

    def _emit(self, event):
        fields = {"model": event.model, "reason": event.reason, "duration_s": round(event.duration_s, 3)}
        if event.ok:
            log.info(f"model {event.kind}ed", extra={"fields": fields})
        else:
            log.error(f"model {event.kind} failed", extra={"fields": {**fields, "error": event.error}})
        for listener in self.listeners:
            listener(event)
