"""What the operators' page shows, gathered from what the gateway keeps anyway: the routes and their replicas,
the model pool, the scheduler's queues, the health probe, the limiter's limits and the last requests' records.
Plain data for JSON: the page escapes every value it shows."""
import time

from .. import __version__
from ..policy.auth import ADMIN_CLIENT, OPEN_ACCESS_CLIENT
from ..policy.limits import WINDOW_S
from .model_life import local_life, remote_life, warm_stats

# A local model's status is the pool's; a llama-server the gateway does not run is as its health probe says.
REMOTE_STATUS = {"ok": "loaded", "degraded": "loaded", "down": "down"}


def gateway_state(app) -> dict:
    """Everything the page shows: models, clients and the last requests."""
    extensions = app.extensions
    window_s = app.config.get("RATE_LIMIT_WINDOW_S", WINDOW_S)  # as policy/hooks.py reads it
    # started_at: counts are kept in memory, and begin again at a restart; the page says so when it changes.
    return {"gateway": {"started_at": extensions["ui_started_at"], "version": __version__, "now": time.time()},
            "models": models_state(extensions), "clients": clients_state(extensions, window_s),
            "recent": extensions["recent_requests"].latest(), "window_s": window_s}


def models_state(extensions) -> list:
    """Each route: its name, status, health, replicas, requests in flight and queued, its life (model_life.py),
    and whether the gateway runs it (then the page offers to load and unload it)."""
    router, pool, scheduler = extensions["router"], extensions.get("model_pool"), extensions.get("scheduler")
    report = extensions["health_probe"].report()
    queues = {queue.name: queue for queue in scheduler.queues} if scheduler is not None else {}
    kv, book = warm_stats(extensions), extensions["model_life"]
    shown = []
    for route in router.all_routes:
        local = pool.model_for(route) if pool is not None else None
        probed = report["models"][route.name] if route.name is not None else \
            {"status": report["status"], "replicas": [report["upstream"]]}
        queue = queues.get(route.name)
        failure = local.failure if local is not None and local.status == "failed" else None
        own = local_life(pool, local, route, book, kv.get(local.name)) if local is not None else \
            {"status": REMOTE_STATUS[probed["status"]], "life": remote_life(route, kv.get(route.name))}
        shown.append({"name": route.name if route.name is not None else local.name if local is not None else None,
                      "any_name": route.name is None,  # LLAMA_SERVER_URL: one llama-server takes any model name
                      "managed": local is not None,
                      **own,
                      "health": probed["status"], "failure": failure,
                      "in_flight": sum(replica.in_flight for replica in route.replicas),
                      "queued": (queue.depth if queue is not None else 0) + (local.waiting if local else 0),
                      "replicas": [_replica(replica, seen, failure)
                                   for replica, seen in zip(route.replicas, probed["replicas"])]})
    return shown


def _replica(replica, seen, failure) -> dict:
    """One replica: the probe's word on it (ok, loading, unreachable, unloaded, failed) and the gateway's own."""
    reason = seen.get("reason")
    return {"url": replica.label, "health": seen.get("status"), "reason": None if reason == failure else reason,
            "latency_ms": seen.get("latency_ms"), "in_flight": replica.in_flight, "ejected": replica.ejected,
            "slots": replica.slots}


def clients_state(extensions, window_s) -> list:
    """Each client: its requests, tokens and failures over the last hour, its use of its limits over the last
    window (as this gateway counted them), and its requests waiting for a slot now."""
    keyring, limiter = extensions["keyring"], extensions["limiter"]
    counts = extensions["recent_requests"].by_client(window_s)
    waiting = waiting_by_client(extensions.get("scheduler"))
    ids = keyring.client_ids + stored_clients(extensions.get("store")) or [OPEN_ACCESS_CLIENT]
    ids += [client for client in (*counts, *waiting) if client not in ids]
    empty = {"requests": 0, "tokens": 0, "failures": 0, "window_requests": 0, "window_tokens": 0}
    shown = []
    for client in ids:
        # The admin key is under no client limit (policy/hooks.py): its limits would be a default it never meets.
        limits = None if client == ADMIN_CLIENT else limiter.limits_for(client)
        shown.append({"id": client, **counts.get(client, empty), "waiting": waiting.get(client, 0),
                      "limits": None if limits is None else {"rpm": limits.rpm, "tpm": limits.tpm,
                                                             "concurrent": limits.concurrent}})
    return shown


# Keys made at run time listed even without traffic, at most (a team may hold thousands: those with traffic in the
# last hour are listed all the same).
STORED_CLIENTS_SHOWN = 100


def stored_clients(store) -> list:
    """The client ids (names) of the usable keys made at run time, the first STORED_CLIENTS_SHOWN by name."""
    if store is None:
        return []
    now = time.time()
    return sorted(key.name for key in store.keys.cached() if key.usable(now))[:STORED_CLIENTS_SHOWN]


def waiting_by_client(scheduler) -> dict:
    """Requests waiting for a slot now, per client, over every model's queue."""
    waiting = {}
    if scheduler is None:
        return waiting
    for queue in scheduler.queues:
        for client, count in queue.waiting_by_client().items():
            waiting[client] = waiting.get(client, 0) + count
    return waiting


def queue_depths(extensions) -> dict:
    """Each model's requests waiting now: for a slot (the scheduler's queues) or for its load (the pool)."""
    scheduler, pool = extensions.get("scheduler"), extensions.get("model_pool")
    depths = {}
    for queue in scheduler.queues if scheduler is not None else ():
        if queue.name is not None:
            depths[queue.name] = depths.get(queue.name, 0) + queue.depth
    for name, model in (pool.models.items() if pool is not None else ()):
        depths[name] = depths.get(name, 0) + model.waiting
    return depths
