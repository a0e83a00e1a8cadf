"""What the operators' page shows, gathered from what the gateway keeps anyway: the routes and their replicas,
the model pool, the scheduler's queues, the health probe, the limiter's limits and the last requests' records.
Plain data for JSON: the page escapes every value it shows."""
from ..policy.auth import ADMIN_CLIENT, OPEN_ACCESS_CLIENT
from ..policy.limits import WINDOW_S

# A local model's status is the pool's; a llama-server the gateway does not run is as its health probe says.
REMOTE_STATUS = {"ok": "loaded", "degraded": "loaded", "down": "down"}


def gateway_state(app) -> dict:
    """Everything the page shows: models, clients and the last requests."""
    extensions = app.extensions
    window_s = app.config.get("RATE_LIMIT_WINDOW_S", WINDOW_S)  # as policy/hooks.py reads it
    return {"models": models_state(extensions), "clients": clients_state(extensions, window_s),
            "recent": extensions["recent_requests"].latest(), "window_s": window_s}


def models_state(extensions) -> list:
    """Each route: its name, status, health, replicas, requests in flight and queued, and whether the gateway
    runs it (then the page offers to load and unload it)."""
    router, pool, scheduler = extensions["router"], extensions.get("model_pool"), extensions.get("scheduler")
    report = extensions["health_probe"].report()
    queues = {queue.name: queue for queue in scheduler.queues} if scheduler is not None else {}
    shown = []
    for route in router.all_routes:
        local = pool.model_for(route) if pool is not None else None
        probed = report["models"][route.name] if route.name is not None else \
            {"status": report["status"], "replicas": [report["upstream"]]}
        queue = queues.get(route.name)
        failure = local.failure if local is not None and local.status == "failed" else None
        shown.append({"name": route.name if route.name is not None else local.name if local is not None else None,
                      "any_name": route.name is None,  # LLAMA_SERVER_URL: one llama-server takes any model name
                      "managed": local is not None,
                      "status": local.status if local is not None else REMOTE_STATUS[probed["status"]],
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
    ids = keyring.client_ids or [OPEN_ACCESS_CLIENT]
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


def waiting_by_client(scheduler) -> dict:
    """Requests waiting for a slot now, per client, over every model's queue."""
    waiting = {}
    if scheduler is None:
        return waiting
    for queue in scheduler.queues:
        for client, count in queue.waiting_by_client().items():
            waiting[client] = waiting.get(client, 0) + count
    return waiting
