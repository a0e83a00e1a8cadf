"""The models-on-demand metrics: loads, unloads and their reasons, load times, and which models are loaded now.
Labels are the configured model names (bounded)."""
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

# A tiny model loads in tens of milliseconds, a large one from a slow disk in minutes.
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ModelMetrics:
    """Counts each load and unload the pool reports (it calls observe with each ModelEvent)."""

    def __init__(self, registry, pool):
        self.loads = Counter("gateway_model_loads", "Models loaded (on demand, at start, by the admin, after a "
                             "crash)", ["model"], registry=registry)
        self.load_failures = Counter("gateway_model_load_failures", "Model loads that failed", ["model"],
                                     registry=registry)
        self.unloads = Counter("gateway_model_unloads", "Models unloaded, by reason (lru, memory, idle, admin)",
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


def init_model_metrics(app, registry):
    """Count the app's model pool's loads and unloads, if it has a pool."""
    pool = app.extensions.get("model_pool")
    if pool is not None:
        pool.listeners.append(ModelMetrics(registry, pool).observe)
