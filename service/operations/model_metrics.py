"""Per-model metrics: loads, unloads and their reasons, load times, which models are loaded now (models on
demand); time waited for a slot, requests waiting, and cache-aware placement (scheduling). Labels are the
configured model names (bounded; "*" for the one upstream of any name)."""
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

# A slot comes free in milliseconds on an idle box, after whole generations on a busy one.
QUEUE_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# A tiny model loads in tens of milliseconds, a large one from a slow disk in minutes.
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ModelMetrics:
    """Counts each load and unload the pool reports (it calls observe with each ModelEvent)."""

    def __init__(self, registry, pool):
        self.loads = Counter("gateway_model_loads", "Models loaded (on demand, at start, by the admin, after a "
                             "crash, after a reload of the models file)", ["model"], registry=registry)
        self.load_failures = Counter("gateway_model_load_failures", "Model loads that failed", ["model"],
                                     registry=registry)
        self.unloads = Counter("gateway_model_unloads", "Models unloaded, by reason (lru, memory, idle, admin; "
                               "reload: its process restarted with a new command line; removed: gone from the "
                               "models file)",
                               ["model", "reason"], registry=registry)
        self.load_seconds = Histogram("gateway_model_load_seconds", "Time to load a model until its llama.cpp "
                                      "serves", ["model"], buckets=LOAD_BUCKETS, registry=registry)
        registry.register(LoadedModelsCollector(pool))

    def observe(self, event):
        """Count one ModelEvent."""
        if event.kind == "unload":
            self.unloads.labels(event.model, event.reason).inc()
        elif not event.ok:
            self.load_failures.labels(event.model).inc()
        else:
            self.loads.labels(event.model).inc()
            if event.reason != "restart":  # a restart's time is the supervisor's backoff as much as the load
                self.load_seconds.labels(event.model).observe(event.duration_s)


class LoadedModelsCollector:
    """gateway_model_loaded{model}: 1 while a model is loaded, read from the pool at scrape time."""

    def __init__(self, pool):
        self.pool = pool

    def collect(self):
        """One sample per local model."""
        loaded = GaugeMetricFamily("gateway_model_loaded", "1 while a local model is loaded (serving), else 0",
                                   labels=["model"])
        for name, status in self.pool.statuses().items():
            loaded.add_metric([name], 1 if status == "loaded" else 0)
        yield loaded


class QueueMetrics:
    """Time waited for a slot (the scheduler reports each wait) and placements among replicas (from each
    request's record)."""

    def __init__(self, registry, scheduler):
        self.wait = Histogram("gateway_queue_wait_seconds", "Time a request waited in the gateway for a slot of "
                              "its model (SCHEDULER=fair)", ["model"], buckets=QUEUE_BUCKETS, registry=registry)
        self.affinity = Counter("gateway_cache_affinity", "Placements among a model's replicas: hit (the replica "
                                "that served the prompt's beginning), miss (none did), overflow (it was too busy)",
                                ["model", "result"], registry=registry)
        self._waits = {}
        if scheduler is not None:
            registry.register(QueueDepthCollector(scheduler))

    def observe_wait(self, model, waited_s):
        """Count one request's wait for a slot."""
        per_model = self._waits.get(model)
        if per_model is None:
            # labels() takes a lock and hashes on every call: each model's child is looked up once (they are few).
            per_model = self._waits[model] = self.wait.labels(model or "*")
        per_model.observe(waited_s)

    def observe(self, record):
        """Count one finished request's placement, if it was placed cache-aware."""
        if record.affinity is not None and record.replica is not None:
            self.affinity.labels(record.replica.route.name or "*", record.affinity).inc()


class QueueDepthCollector:
    """gateway_queue_depth{model}: requests waiting for a slot now, read from the scheduler at scrape time."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def collect(self):
        """One sample per model that has had a queue."""
        depth = GaugeMetricFamily("gateway_queue_depth", "Requests waiting in the gateway for a slot of their model",
                                  labels=["model"])
        for queue in self.scheduler.queues:
            depth.add_metric([queue.name or "*"], queue.depth)
        yield depth


def init_model_metrics(app, registry) -> QueueMetrics:
    """Count the app's model pool's loads and unloads, if it has a pool, and its scheduler's waits."""
    pool = app.extensions.get("model_pool")
    if pool is not None:
        pool.listeners.append(ModelMetrics(registry, pool).observe)
    scheduler = app.extensions.get("scheduler")
    queues = QueueMetrics(registry, scheduler)
    if scheduler is not None:
        scheduler.listeners.append(queues.observe_wait)
    return queues
