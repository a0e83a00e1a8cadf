"""Warm conversations in the gateway: made where the gateway runs its models and shares their slots (a pool and the
fair scheduler), told by the pool when a model's llama.cpp (re)starts or is about to stop, asked by the scheduler
which routes hand out slot ids, read by the request path (proxy/warm_request.py), the metrics and the page."""
import json
import logging
import os
import threading

from ..errors import UpstreamError
from ..llama.pooled_model import LOADED
from .conversations import WarmConversations
from .identity import llama_build, model_identity

log = logging.getLogger(__name__)


class WarmGateway:
    """The gateway's warm conversations over its pool, scheduler and routes."""

    def __init__(self, conversations, pool, scheduler, router):
        self.conversations = conversations
        self.pool, self.scheduler, self.router = pool, scheduler, router
        self._processes = {}  # model name -> the llama.cpp process its WarmModel was attached for
        self._lock = threading.Lock()

    def numbered(self, route) -> bool:
        """True where route's queue hands out slot ids: one llama.cpp, run by the gateway, keeping slot states."""
        if len(route.replicas) != 1 or route.spec is None:
            return False
        model = self.pool.model_for(route)
        return model is not None and getattr(model.supervisor, "kv_identity", None) is not None

    def model(self, name):
        """The WarmModel of model name while its llama.cpp serves, else None. Attached here, at the first request
        that asks, as well as on the pool's load event: the requests that waited for a load go on before the pool
        tells its listeners, and the first of them is the one a swap most likely brings back."""
        with self._lock:
            return self._attached(name)

    def on_model_event(self, event):
        """A pool event: a llama.cpp that (re)started holds nothing in its slots; one that stopped is forgotten."""
        with self._lock:
            if event.kind != "load" or not event.ok or self._attached(event.model) is None:
                self._processes.pop(event.model, None)
                self.conversations.detach(event.model)

    def _attached(self, name):
        """name's WarmModel for the llama.cpp serving now, attached once per process (under the lock)."""
        pooled = self.pool.model_named(name)
        supervisor = pooled.supervisor if pooled is not None else None
        process = supervisor.process if supervisor is not None else None
        if process is None or pooled.state != LOADED or getattr(supervisor, "kv_identity", None) is None:
            return None
        model = self.conversations.model(name)
        if model is not None and self._processes.get(name) is process:
            return model
        if not self._same_identity(name, supervisor):
            return None
        self._processes[name] = process  # a restarted llama.cpp is a new process: its slots start empty
        return self.conversations.attach(name, supervisor.url, supervisor.kv_identity, parallel_of(supervisor.flags),
                                         LiveQueue(self, name))

    def _same_identity(self, name, supervisor) -> bool:
        """Whether the model's file is still the one its llama.cpp was told to save states for. A file replaced
        under the same path while the gateway runs: this llama.cpp's states would be filed under the old one's
        identity, so none are saved or restored until its next start, which gets the new identity's folder."""
        try:
            now = model_identity(supervisor.model_path, supervisor.flags, llama_build(supervisor.binary))
        except OSError:
            return False
        if now == supervisor.kv_identity:
            return True
        log.warning("model file changed since the gateway started: its conversation states wait for its next load",
                    extra={"fields": {"model": name}})
        flags = supervisor.flags
        at = flags.index("--slot-save-path") + 1
        flags[at] = os.path.join(os.path.dirname(os.path.dirname(flags[at])), now) + os.sep
        supervisor.kv_identity = now
        return False

    def before_stop(self, pooled):
        """Save the model's unsaved long slots (its requests are done: it has drained), then forget it."""
        try:
            saved = self.conversations.save_all(pooled.name)
            if saved:
                log.info("conversation states saved before the model stops",
                         extra={"fields": {"model": pooled.name, "states": saved}})
        finally:
            with self._lock:
                self._processes.pop(pooled.name, None)
                self.conversations.detach(pooled.name)

    def stats(self) -> dict:
        """Saved states per model: {model: {"states", "tokens", "bytes"}}."""
        return self.conversations.stats()

    def stop(self):
        """Stop the saver thread."""
        self.conversations.stop()


class LiveQueue:
    """A model's fair queue as it is now: a reload may give the model a new route, and with it a new queue."""

    def __init__(self, gateway, name):
        self.gateway, self.name = gateway, name

    def _queue(self):
        return self.gateway.scheduler.queue_for(self.gateway.router.route(self.name))

    def claim_idle(self, slot) -> bool:
        """Take an idle slot for a save (False if busy, or the model has no route any more)."""
        try:
            return self._queue().claim_idle(slot)
        except Exception:  # noqa: BLE001 - a model a reload removed: nothing to save into
            return False

    def unclaim(self, slot):
        """Give a claimed slot back."""
        try:
            self._queue().unclaim(slot)
        except Exception:  # noqa: BLE001
            log.debug("unclaiming a slot of a model without a route", exc_info=True)

    def idle_slots(self) -> list:
        """The slots no request holds."""
        try:
            return self._queue().idle_slots()
        except Exception:  # noqa: BLE001
            return []


def parallel_of(flags) -> int:
    """llama.cpp's slot count from its flags (the last --parallel wins, as in llama.cpp); 1 when unset."""
    count = 1
    for flag, value in zip(flags, flags[1:]):
        if flag in ("--parallel", "-np"):
            count = int(value)
    return count


def poster(upstream):
    """post(base_url, path, body, timeout) -> (status, parsed JSON or None) through the app's Upstream."""
    def post(base_url, path, body, timeout=None):
        try:
            response = upstream.request("POST", path, group="completions", base_url=base_url,
                                        body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        except UpstreamError as error:
            return error.upstream_status or 502, None
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None
    return post


def init_warm(app, settings):
    """Give app its warm conversations (app.extensions["warm"]): a WarmGateway where the gateway runs models and
    shares their slots (a pool, SCHEDULER=fair) and KV_CACHE_DIR and KV_CACHE_DISK_MIB allow; else None."""
    pool, scheduler = app.extensions.get("model_pool"), app.extensions.get("scheduler")
    if pool is None or scheduler is None or not settings.get("KV_CACHE_DIR") or not settings["KV_CACHE_DISK_MIB"]:
        app.extensions["warm"] = None
        return None
    conversations = WarmConversations(settings["KV_CACHE_DIR"], settings["KV_CACHE_DISK_MIB"],
                                      settings["KV_SAVE_MIN_TOKENS"], settings["KV_SAVE_INTERVAL_S"],
                                      poster(app.extensions["upstream"]))
    warm = app.extensions["warm"] = WarmGateway(conversations, pool, scheduler, app.extensions["router"])
    scheduler.numbered = warm.numbered
    pool.listeners.append(warm.on_model_event)
    pool.before_stop.append(warm.before_stop)
    conversations.start()
    return warm
