"""Each model's life, for the operators' page: its memory, context and slots, its last load, when it was last used
and when its idle TTL will unload it, its llama.cpp's restarts and last exit, and which models a Load would unload
now (read from the pool and its Room under the pool's lock, changing nothing).

The pool keeps its times on its own clock (monotonic); the page is given epoch seconds.
"""
import logging
import threading
import time

from ..llama.pooled_model import LOADED, LOADING
from ..llama.room import holds_room
from ..models.model_memory import estimate_mib

# llama-server's flags for the context and the slots: a model's own args may set them after the gateway's.
CTX_FLAGS, PARALLEL_FLAGS = ("-c", "--ctx-size"), ("-np", "--parallel")

log = logging.getLogger(__name__)


class LifeBook:
    """What the pool does not keep: each model's last load (how long it took, when it ended), and memory
    estimates made for models the pool has none for (no MODELS_MEMORY_MIB)."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self._loads = {}  # model name -> {"load_s", "loaded_at"}
        self._estimates = {}  # (path, ctx) -> MiB or None
        self._lock = threading.Lock()

    def observe(self, event):
        """Take one of the pool's ModelEvents (a pool listener)."""
        with self._lock:
            if event.kind == "unload":
                self._loads.pop(event.model, None)
            elif event.ok:
                last = self._loads.get(event.model, {})
                # A restart's event carries no duration: the load time shown stays the last real load's.
                took = last.get("load_s") if event.reason == "restart" else round(event.duration_s, 3)
                self._loads[event.model] = {"load_s": took, "loaded_at": self.clock()}

    def last_load(self, name) -> dict:
        """{"load_s", "loaded_at"} of the model's last load, None each while unknown."""
        with self._lock:
            return dict(self._loads.get(name) or {"load_s": None, "loaded_at": None})

    def memory_mib(self, model, ctx):
        """The pool's estimate of the model's memory, else one made from its GGUF (once per file and context)."""
        if model.need_mib is not None:
            return round(model.need_mib, 1)
        path = getattr(model.supervisor, "model_path", None)
        if path is None or ctx is None:
            return None
        key = (path, ctx)
        if key not in self._estimates:
            mib = estimate_mib(path, ctx)
            self._estimates[key] = None if mib is None else round(mib, 1)
        return self._estimates[key]


def flag_value(flags, names):
    """The last value given to one of names among llama-server's flags (["--ctx-size", "4096"] or "-c=4096")."""
    found = None
    for index, token in enumerate(flags):
        name, equals, value = str(token).partition("=")
        if name in names:
            found = value if equals else (flags[index + 1] if index + 1 < len(flags) else None)
    return int(found) if found is not None and str(found).isdigit() else None


def status_of(model) -> str:
    """The page's word for a local model: its pool state, or "restarting" while its llama.cpp is brought back."""
    if model.restarting and model.state == LOADING:
        return "restarting"
    return model.state


def load_unloads(pool, model) -> list:
    """The names of the models a Load of model would unload now (none when it is loaded, loading, fits, or could
    never fit beside the pinned ones), as the pool would choose them. Call with the pool's lock held."""
    everyone = pool._everyone()
    if holds_room(model):
        return []
    shortfall = pool.room.shortfall(model, everyone)
    if shortfall is None or pool.room.never_fits(model, everyone):
        return []
    victims, _ = pool.room.victims(everyone, *shortfall)
    return [victim.name for victim in victims]


def local_life(pool, model, route, book, kv) -> dict:
    """A local model's status and life (see the page's JSON contract)."""
    supervisor = model.supervisor
    flags = list(getattr(supervisor, "flags", ()))
    ctx = flag_value(flags, CTX_FLAGS) or getattr(supervisor, "ctx", None)
    memory = book.memory_mib(model, ctx)  # outside the pool's lock: it may read the GGUF once
    wall = time.time()
    with pool._changed:
        now, state = pool.clock(), model.state
        status, running, waiting, last_used = status_of(model), model.running, model.waiting, model.last_used
        ttl = pool._ttl(model)
        unloads = load_unloads(pool, model)
    idle_at = None
    if ttl and state == LOADED and running == 0 and waiting == 0:
        idle_at = wall + (last_used + ttl - now)
    slots = [replica.slots for replica in route.replicas]
    return {"status": status, "life": {
        "memory_mib": memory, "ctx": ctx,
        "slots_total": sum(slots) if slots and None not in slots else flag_value(flags, PARALLEL_FLAGS),
        "slots_busy": sum(replica.in_flight for replica in route.replicas),
        **book.last_load(model.name),
        "last_used": wall if running else (wall - (now - last_used) if last_used else None),
        "idle_unload_at": idle_at, "restarts": getattr(supervisor, "restarts", 0),
        "last_exit": getattr(supervisor, "last_exit", None), "last_exit_at": getattr(supervisor, "last_exit_at", None),
        "pinned": bool(model.pinned), "load_unloads": unloads, "kv": kv}}


def remote_life(route, kv) -> dict:
    """A llama-server the gateway does not run: what the gateway sees of it (its slots, their use)."""
    slots = [replica.slots for replica in route.replicas]
    return {"memory_mib": None, "ctx": None, "slots_total": sum(slots) if slots and None not in slots else None,
            "slots_busy": sum(replica.in_flight for replica in route.replicas), "load_s": None, "loaded_at": None,
            "last_used": None, "idle_unload_at": None, "restarts": 0, "last_exit": None, "last_exit_at": None,
            "pinned": False, "load_unloads": [], "kv": kv}


def warm_stats(extensions) -> dict:
    """Warm conversations per model ({"states", "tokens", "bytes"}), where the gateway keeps them (service/warm)."""
    warm = extensions.get("warm")
    if warm is None:
        return {}
    try:
        return warm.stats() or {}
    except Exception:  # noqa: BLE001 - the page shows no warm conversations rather than no models
        log.warning("reading the warm conversations' stats failed", exc_info=True)
        return {}
