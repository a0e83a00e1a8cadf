"""Warm conversations in the gateway: made where the gateway runs its models and shares their slots (a pool and the
fair scheduler), told by the pool when a model's llama.cpp (re)starts or is about to stop, asked by the scheduler
which routes hand out slot ids, read by the request path (proxy/warm_request.py), the metrics and the page."""
import logging
import os
import threading

from ..llama.pooled_model import LOADED
from .conversations import WarmConversations
from .identity import llama_build, model_identity
from .links import LiveQueue, parallel_of, poster

log = logging.getLogger(__name__)

# How far llama.cpp's count of a prompt's tokens (/slots) may be from the one its answer reported to the client.
SLOT_TOKENS_SLACK = 8
# Where the caller did not say how many tokens the request generated: the most it is taken to have.
MAX_UNKNOWN_COMPLETION = 32768


class WarmGateway:
    """The gateway's warm conversations over its pool, scheduler and routes."""

    def __init__(self, conversations, pool, scheduler, router, upstream=None):
        self.conversations = conversations
        self.pool, self.scheduler, self.router, self.upstream = pool, scheduler, router, upstream
        self._processes = {}  # model name -> the llama.cpp process its WarmModel was attached for
        self._refused = {}  # model name -> a llama.cpp process started for a file since replaced
        self._lock = threading.Lock()

    def numbered(self, route) -> bool:
        """True where route's queue hands out slot ids: one llama.cpp, run by the gateway, keeping slot states."""
        if len(route.replicas) != 1 or route.spec is None:
            return False
        model = self.pool.model_for(route)
        if model is None or getattr(model.supervisor, "kv_identity", None) is None:
            return False
        # An id means a slot of llama.cpp's only where the queue's count is llama.cpp's (llama.cpp takes an id past
        # its slots modulo their count: two requests would share one slot, their states saved under wrong names).
        return route.spec.slots in (None, parallel_of(model.supervisor.flags))

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
        if self._refused.get(name) is process or not self._same_identity(name, supervisor):
            self._refused[name] = process  # saving into the old identity's folder: never, until it restarts
            return None
        self._processes[name] = process  # a restarted llama.cpp is a new process: its slots start empty
        return self.conversations.attach(name, supervisor.url, supervisor.kv_identity, parallel_of(supervisor.flags),
                                         LiveQueue(self, name))

    def slot_that_ran(self, model, prompt_tokens, completion_tokens=None):
        """The slot a request just ran in, where llama.cpp chose it (Anthropic's /v1/messages takes no id_slot):
        of the idle slots, the one that ran the latest task, if it holds this request's tokens (its prompt, then
        what it generated: llama.cpp counts them together, within a few tokens, as the families count a
        template's tokens differently; any count where prompt_tokens is None); None when /slots cannot tell."""
        latest = self._latest_idle(model)
        if not latest:
            return None
        if prompt_tokens is None:
            return latest[0]["id"]
        held = latest[0].get("n_prompt_tokens")
        most = prompt_tokens + (completion_tokens if completion_tokens is not None else MAX_UNKNOWN_COMPLETION)
        fits = isinstance(held, int) and prompt_tokens - SLOT_TOKENS_SLACK <= held <= most + SLOT_TOKENS_SLACK
        return latest[0]["id"] if fits else None

    def slots_that_ran(self, model, tasks: int) -> list:
        """The slots the latest tasks ran in (an embedding of several texts is a task per text)."""
        return [slot["id"] for slot in self._latest_idle(model)[:max(1, tasks)]]

    def _latest_idle(self, model) -> list:
        """llama.cpp's idle slots, the one that ran the latest task first; [] when /slots cannot tell."""
        if self.upstream is None:
            return []
        try:
            response = self.upstream.request("GET", "/slots?fields=all", group="models", base_url=model.base_url)
            slots = response.json()
        except Exception:  # noqa: BLE001 - llama.cpp without /slots (--no-slots), or busy: nothing learnt
            return []
        if not isinstance(slots, list):
            return []
        idle = [slot for slot in slots if isinstance(slot, dict) and not slot.get("is_processing")
                and isinstance(slot.get("id"), int) and isinstance(slot.get("id_task"), int)]
        return sorted(idle, key=lambda slot: slot["id_task"], reverse=True)

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
    warm = app.extensions["warm"] = WarmGateway(conversations, pool, scheduler, app.extensions["router"],
                                                app.extensions["upstream"])
    scheduler.numbered = warm.numbered
    pool.listeners.append(warm.on_model_event)
    pool.before_stop.append(warm.before_stop)
    conversations.start()
    return warm
