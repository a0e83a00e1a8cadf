"""The pool changed while it runs: the admin's load and unload, and a reload of the models file (a model added,
removed, given a new llama.cpp command line, or new settings in place). Each change goes through the states the
pool already has (pool.py): a removed model drains, then unloads, then is forgotten; a replaced one drains,
unloads, takes its new supervisor on the same URL, and loads again. No change stops a llama.cpp that a request is
using, and none releases a Hold: requests in flight end as they always do.
"""
import logging

from .pooled_model import (DRAINING, FAILED, LOAD_RETRY_MAX_S, LOADED, LOADING, SETTINGS, UNLOADED, UNLOADING, Hold,
                           ModelLoadFailed, ModelRemoved)

log = logging.getLogger(__name__)


class LiveChanges:
    """ModelPool's methods for the admin and for a reload (mixed into ModelPool; they run under its lock,
    self._changed)."""

    def load(self, name, reason="admin"):
        """Load a model (if it is not) and wait for it; return its status. Raise as Hold.wait does."""
        with self._changed:
            model = self._named(name)
            if model.state == FAILED:
                if model.retry_at == float("inf"):  # it can never fit, or its supervisor is retrying on its own
                    raise ModelLoadFailed(model.name, model.failure, LOAD_RETRY_MAX_S)
                model.retry_at = self.clock()  # an operator's load tries at once
            hold = Hold(self, model, model.failed_loads, self.clock() + self.load_timeout)
            model.waiting += 1
            self._want(model, reason)
            self._plan()
        try:
            hold.wait()
        finally:
            hold.release()
        return model.status

    def unload(self, name, reason="admin"):
        """Unload a model once its requests have ended (new ones wait for it to load again); return its status,
        draining or unloading when that has not ended within LLAMA_STARTUP_TIMEOUT_S (it goes on)."""
        with self._changed:
            model = self._named(name)
            deadline = self.clock() + self.load_timeout
            while model.state == LOADING and self._changed.wait(max(0.0, deadline - self.clock())):
                pass  # an unload asked for while loading happens once loaded
            if model.state == LOADED or (model.state == FAILED and model.restarting):
                self._drain(model, reason)  # a failed restart too: its supervisor stops trying
                self._plan()
            elif model.state == DRAINING:
                # It drains to make room for a request that may yet give up (and would have it serve again): the
                # unload is now the admin's, and happens once its requests have ended whatever that request does.
                model.unload_reason = reason
            while model.state in (DRAINING, UNLOADING) and self._changed.wait(max(0.0, deadline - self.clock())):
                pass
            # Clients see a draining model as loaded; the admin who asked for its unload is told it is on its way.
            return model.state if model.state in (DRAINING, UNLOADING) else model.status

    def add(self, model):
        """A new model joins, unloaded; it loads now where start() would have loaded it (preload=on, or no
        MODELS_MAX_LOADED nor MODELS_MEMORY_MIB), else on its first request."""
        with self._changed:
            if model.name in self.models:
                raise ValueError(f"the pool already has a model named {model.name}")
            self._join(model)
            if self._started and model.state == UNLOADED and (model.preload or not self._on_demand()):
                self._want(model, "preload")
                self._plan()
        self._watch_idle()

    def retire(self, name):
        """The model takes no new requests (ModelRemoved, a 404, for a claim or a request waiting for its load),
        finishes those it runs, then its llama.cpp stops (an unload with reason "removed") and it is forgotten.
        Returns at once; the caller drops its route first, so that clients stop naming it."""
        with self._changed:
            model = self.models.pop(self._named(name).name)
            model.removed, model.pending = True, None
            model.wanted_since = model.wanted_by = None
            self._retiring.append(model)
            if self._at_rest(model):
                self._forget(model)  # no llama.cpp to stop
            elif model.state in (LOADED, DRAINING) or model.restarting:
                self._drain(model, "removed")  # a crashed one too: its unload ends its supervisor's restarts
            # Loading: its load ends first (_loaded_meanwhile); unloading: it is on its way (_after_unload).
            self._plan()
            self._changed.notify_all()  # its waiters end with ModelRemoved

    def replace(self, name, supervisor, **settings):
        """The model's llama.cpp must change (a new command line, the same URL): requests in flight finish on the
        old one, new ones wait; once idle, the old one stops (an unload with reason "reload"), the new supervisor
        takes its place, and it loads again if it was loaded (a load with reason "reload"), else on demand. An
        unloaded model takes the new supervisor at once, and loads now where start() would have loaded it (preload=on,
        or no MODELS_MAX_LOADED nor MODELS_MEMORY_MIB). settings: as update()'s, applied with the switch."""
        _check_settings(settings)
        with self._changed:
            model = self._named(name)
            if supervisor.url != model.supervisor.url:
                # Routes reach a model by its URL: a new one would leave them pointing at nothing.
                raise ValueError(f"model {name}: a replacement must serve on {model.supervisor.url}, "
                                 f"not {supervisor.url}")
            # A second replace before the switch: its supervisor wins, the settings of both apply.
            model.pending = (supervisor, {**(model.pending[1] if model.pending else {}), **settings})
            if self._at_rest(model):
                self._take_over(model)
                if self._started and model.state == UNLOADED and (model.preload or not self._on_demand()):
                    self._want(model, "preload")  # a new command line loads where start() would have loaded it
            elif model.state == LOADED or (model.restarting and model.state in (LOADING, FAILED)):
                self._drain(model, "reload")
            # Loading: once loaded it drains (_loaded_meanwhile). Draining or unloading for another reason: the
            # switch happens at its unload, and it loads again on demand (or for the reload, _undrain).
            self._plan()
            self._changed.notify_all()
        self._watch_idle()

    def update(self, name, **settings):
        """Change settings that need no restart (ttl_s, pinned, preload, need_mib) in place; turning preload on
        loads an unloaded model now."""
        _check_settings(settings)
        with self._changed:
            model = self._named(name)
            was_preloaded = model.preload
            self._settle(model, settings)
            if self._started and model.preload and not was_preloaded and model.state == UNLOADED:
                self._want(model, "preload")
            self._plan()  # a model unpinned, or smaller, may make room for one waiting
            self._changed.notify_all()
        self._watch_idle()

    # -- under the lock --------------------------------------------------------------------------------------

    def _join(self, model):
        """Make model one of the pool's: listen to its supervisor, and refuse it now if it can never fit."""
        if self.by_url.get(model.supervisor.url) in self.models.values():
            raise ValueError(f"model {model.name}: another model already serves on {model.supervisor.url}")
        self.models[model.name] = model
        self.by_url[model.supervisor.url] = model
        self._listen(model, model.supervisor)
        self._check_budget(model)

    def _named(self, name):
        model = self.models.get(name)
        if model is None:
            raise ModelRemoved(name)  # a reload removed it between the caller's look and this call
        return model

    @staticmethod
    def _at_rest(model) -> bool:
        """True when no llama.cpp runs for model and no load or unload is under way."""
        return model.state == UNLOADED or (model.state == FAILED and not model.restarting)

    def _forget(self, model):
        self._retiring.remove(model)
        if self.by_url.get(model.supervisor.url) is model:  # not when a new model was added on its URL
            del self.by_url[model.supervisor.url]

    def _take_over(self, model):
        """The pending supervisor replaces model's (whose llama.cpp has stopped): a new command line, tried
        afresh whatever the old one's failures."""
        supervisor, settings = model.pending
        model.pending = None
        model.supervisor = supervisor
        self._listen(model, supervisor)
        model.failure, model.failures_in_row, model.retry_at = None, 0, 0.0
        if model.state == FAILED:
            model.state = UNLOADED
        self._settle(model, settings)

    def _settle(self, model, settings):
        for key, value in settings.items():
            setattr(model, key, value)
        self._check_budget(model)

    def _check_budget(self, model):
        """A model at rest that can never fit MODELS_MEMORY_MIB fails for good (its waiters at once); one that
        fits again (a reload made it smaller) may load."""
        if not self._at_rest(model):
            return  # room.py weighs it at its next load
        reason = self.room.too_big(model)
        if reason is not None and model.failure != reason:
            model.state, model.retry_at, model.failure = FAILED, float("inf"), reason
            model.failed_loads += 1
            log.warning("model too large for the memory budget", extra={"fields": {
                "model": model.name, "need_mib": round(model.need_mib), "budget_mib": self.memory_mib}})
        elif reason is None and model.state == FAILED and model.retry_at == float("inf"):
            model.state, model.retry_at, model.failure = UNLOADED, 0.0, None

    def _loaded_meanwhile(self, model, loaded: bool):
        """A load that ended after its model was retired or replaced: a llama.cpp that came up drains (and is
        stopped once idle); one that did not is forgotten, or replaced by the new supervisor at once."""
        if loaded:
            self._drain(model, "removed" if model.removed else "reload")
            return
        model.state = UNLOADED
        self._after_unload(model, "reload")

    def _after_unload(self, model, reason):
        """Its llama.cpp has stopped: a removed model is forgotten; a replaced one takes its new supervisor and
        loads again if it was unloaded for that; one that requests wait for loads again."""
        if model.removed:
            self._forget(model)
            return
        if model.pending is not None:
            self._take_over(model)
        again = "reload" if reason == "reload" else "request" if model.waiting else None
        model.wanted_since, model.wanted_by = (self.clock(), again) if again else (None, None)


def _check_settings(settings):
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(f"not a setting changed in place: {', '.join(unknown)}; those are: {', '.join(SETTINGS)}")
