"""A local model as the pool sees it (service/llama/pool.py): its states, a request's hold on it, and the errors
and events of loading it."""
import threading
from dataclasses import dataclass

from ..errors import ApiError
from ..models.errors import LlamaStartError

UNLOADED, LOADING, LOADED, DRAINING, UNLOADING, FAILED = (
    "unloaded", "loading", "loaded", "draining", "unloading", "failed")
# What clients see: a model draining still serves the requests it has; one unloading is as good as unloaded.
SHOWN = {DRAINING: LOADED, UNLOADING: UNLOADED}

# After a failed load the next request may try again after 5 s, doubling to 5 minutes.
LOAD_RETRY_S = 5.0
LOAD_RETRY_MAX_S = 300.0


class ModelLoadFailed(ApiError):
    """The model could not be loaded; the message says why and when the next try is."""

    status = 503
    code = "model_load_failed"

    def __init__(self, name, reason, retry_after_s):
        super().__init__(f"The model '{name}' failed to load: {reason}", type="server_error",
                         headers={"Retry-After": str(max(1, round(min(retry_after_s, LOAD_RETRY_MAX_S))))})


class ModelLoadTimeout(ApiError):
    """The model was not loaded within LLAMA_STARTUP_TIMEOUT_S of the request's arrival."""

    status = 503
    code = "model_load_timeout"

    def __init__(self, name, waited_s):
        super().__init__(f"The model '{name}' was not loaded within {waited_s:g} s (LLAMA_STARTUP_TIMEOUT_S); "
                         "try again", type="server_error", headers={"Retry-After": "5"})


class ModelRemoved(ApiError):
    """The model was removed from the gateway's models (a reload of the models file) before it could serve."""

    status = 404
    code = "model_not_found"

    def __init__(self, name):
        super().__init__(f"The model '{name}' was removed from this gateway's models; GET /v1/models lists the "
                         "models", type="invalid_request_error", param="model")


@dataclass
class ModelEvent:
    """A load or an unload that ended: what the log line and the metrics are made of."""

    kind: str  # "load" or "unload"
    model: str
    reason: str  # load: request, admin, preload, restart, reload; unload: lru, memory, idle, admin, reload, removed
    duration_s: float
    ok: bool = True
    error: str = None


# The settings a reload changes in place (ModelPool.update), without restarting llama.cpp.
SETTINGS = ("ttl_s", "pinned", "preload", "need_mib")


class PooledModel:
    """One local model: its supervised llama.cpp, its settings and its state (guarded by the pool's lock)."""

    def __init__(self, name, supervisor, *, ttl_s=0.0, pinned=False, preload=False, need_mib=None):
        self.name = name
        self.supervisor = supervisor
        self.ttl_s = ttl_s
        self.pinned = pinned  # never unloaded to make room, nor when idle
        self.preload = preload
        self.need_mib = need_mib  # estimated from its GGUF; None when there is no budget or it cannot be read
        self.state = UNLOADED
        self.running = 0  # requests using its llama.cpp now
        self.waiting = 0  # requests waiting for it to load
        self.last_used = 0.0
        self.wanted_since = None  # when a request (or the admin) first asked for it since it was last loaded
        self.wanted_by = None  # who: "request" or "admin" (the load's reason)
        self.unload_reason = None  # set when it is chosen to be unloaded
        self.failure = None  # why the last load failed
        self.failed_loads = 0  # over its life: a waiter fails when this grows
        self.failures_in_row = 0
        self.retry_at = 0.0
        self.restarting = False  # its supervisor is restarting a llama.cpp that died
        self.removed = False  # a reload removed it: no new requests; forgotten once its llama.cpp has stopped
        self.pending = None  # (supervisor, settings) a reload gave it, taking over once its llama.cpp has stopped

    @property
    def status(self) -> str:
        """loaded, loading, unloaded or failed."""
        return SHOWN.get(self.state, self.state)


class Hold:
    """One request's claim on a model: while held, the model is not unloaded. Released exactly once."""

    def __init__(self, pool, model, failed_loads, deadline):
        self.pool = pool
        self.model = model
        self._failed_loads = failed_loads  # the model's count when the claim was made
        self._deadline = deadline
        self.running = False  # True once the model is loaded for it
        self.released = False

    def wait(self, timeout=None, gone=None) -> bool:
        """Wait up to timeout (None: as long as the load may take) for the model to be loaded; True when it is.
        Raise ModelLoadFailed or ModelLoadTimeout when it will not be, ClientClosedRequest once gone() says the
        client left (and let go of the claim)."""
        return self.pool._wait(self, timeout, gone)

    def release(self):
        """Let go of the model: the request is over. A second call does nothing."""
        self.pool._release(self)

    def wait_for_restart(self, gone=None) -> bool:
        """After its llama.cpp could not be reached: if the model is being restarted (it died), wait for that as
        for a load and return True (the request may be sent again); False when it is not (the failure stands)."""
        return self.pool._wait_for_restart(self, gone)


def load_failure(error) -> str:
    """A load failure in one line: the supervisor's reason, and llama.cpp's first error line (its log lines are
    "<time> <level> <text>"), else its last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    reason, said = lines[0].rstrip(":;"), lines[1:]
    errors = [line.split(" E ", 1)[1] for line in said if " E " in line[:24]]
    detail = errors[0] if errors else said[-1] if said else None
    return f"{reason}: {detail.strip()}" if detail else reason


def start_together(models):
    """Start several models' llama.cpp side by side (they load at once); if one fails, stop them all and raise
    a LlamaStartError naming it."""
    failures = []

    def start(model):
        try:
            model.supervisor.start()
        except Exception as error:  # noqa: BLE001 - an OSError from spawning it too: named, in one line
            failures.append(LlamaStartError(f"model {model.name}: {error}"))

    threads = [threading.Thread(target=start, args=(model,), name="model-preload") for model in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        for model in models:
            model.supervisor.stop()
        raise failures[0]
