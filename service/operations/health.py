"""The health probe: how the llama-servers are, asked at most once per HEALTH_CACHE_S however often /health is
polled, and never making a caller wait behind a slow probe once there is a report."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import UpstreamError


class HealthProbe:
    """Asks the llama-servers how they are at most once per ttl seconds, however often /health is polled."""

    def __init__(self, upstream, router, ttl_s, up_gauge, pool=None):
        self.upstream = upstream
        self.router = router
        self.pool = pool  # the local models (service/llama/pool.py): one not loaded is not probed
        self.ttl = ttl_s
        self.up_gauge = up_gauge
        self._ready = threading.Condition()  # guards the three below; notified when a refresh ends
        self._checked = float("-inf")
        self._report = None
        self._refreshing = False
        self._pool = None

    def report(self) -> dict:
        """The latest report: {"status": "ok"|"degraded"|"down", "age_s" (how old it is), and "upstream": {...}
        with one upstream for any model, or "models": {name: {"status", "replicas": [...]}} where the gateway
        routes by model}.

        A stale report is refreshed by one caller; the others get the stale one meanwhile, so that a slow
        llama-server delays one poll, not every one. Only while there is no report yet do callers wait, for
        that one probe, which its timeouts bound.
        """
        with self._ready:
            while True:
                now = time.monotonic()
                if self._report is not None and (now - self._checked < self.ttl or self._refreshing):
                    return {**self._report, "age_s": round(now - self._checked, 3)}
                if not self._refreshing:
                    break
                self._ready.wait()
            self._refreshing = True
        report = None
        try:
            report = self._probe_all()
        finally:  # a probe that raised leaves the refresh to the next caller
            with self._ready:
                self._refreshing = False
                if report is not None:
                    self._report, self._checked = report, time.monotonic()
                    self.up_gauge.set(0 if report["status"] == "down" else 1)
                self._ready.notify_all()
        return {**report, "age_s": 0.0}

    def _probe_all(self) -> dict:
        if self.router.fallback is not None:
            upstream = self._probe(self.router.fallback.replicas[0])
            return {"status": upstream.pop("serving"), "upstream": upstream}
        replicas = [replica for route in self.router.routes.values() for replica in route.replicas]
        if self._pool is None:
            # Every replica is probed at once, so that however many hang, a refresh costs one probe's timeouts.
            self._pool = ThreadPoolExecutor(len(replicas), thread_name_prefix="health-probe")
        reports = dict(zip(replicas, self._pool.map(self._probe, replicas)))
        models = {}
        for name, route in self.router.routes.items():
            shown = [reports[replica] for replica in route.replicas]
            serving = [report.pop("serving") for report in shown]
            status = "down" if "ok" not in serving and "degraded" not in serving else \
                "ok" if all(state == "ok" for state in serving) else "degraded"
            models[name] = {"status": status, "replicas": shown}
        states = [model["status"] for model in models.values()]
        status = "down" if all(state == "down" for state in states) else \
            "ok" if all(state == "ok" for state in states) else "degraded"
        return {"status": status, "models": models}

    def _probe(self, replica) -> dict:
        """One replica's report; its "serving" is ok, degraded (requests queued) or down (unreachable, loading
        or ejected)."""
        started = time.perf_counter()
        upstream = {"url": replica.label}
        local = self.pool.by_url.get(replica.url) if self.pool is not None else None
        if local is not None and local.status != "loaded":
            return {**upstream, **_not_loaded(local)}
        try:
            self.upstream.request("GET", "/health", group="models", base_url=replica.url).close()
        except UpstreamError as error:
            replica.route.probed(replica, False)
            upstream.update(status="loading" if error.kind == "loading" else "unreachable", reason=error.message)
            return {**upstream, **_rotation(replica), "serving": "down"}
        replica.route.probed(replica, True)
        upstream.update(status="ok", latency_ms=round((time.perf_counter() - started) * 1000, 1))
        upstream.update(self._load(replica.url))
        upstream.update(_rotation(replica))
        # Serving, but with requests queued behind busy slots: answers will be slow.
        serving = "down" if replica.ejected else "degraded" if upstream.get("requests_deferred") else "ok"
        return {**upstream, "serving": serving}

    def _load(self, base_url) -> dict:
        """Busy and queued requests from llama.cpp's /metrics, when it has them on."""
        try:
            response = self.upstream.request("GET", "/metrics", group="models", base_url=base_url)
        except UpstreamError:
            return {}
        load = {}
        for line in response.text.splitlines():
            name, _, number = line.partition(" ")
            if name in ("llamacpp:requests_processing", "llamacpp:requests_deferred"):
                load[name.split(":")[1]] = int(float(number))
        return load


def _not_loaded(model) -> dict:
    """A local model that is not loaded: no fault while it can be loaded (unloaded, or loading), down when its
    load failed."""
    if model.status == "failed":
        # Not llama.cpp's words: /health is public, and they name files on the box. The log line has them.
        return {"status": "failed", "reason": "its llama.cpp failed to load (the gateway's log says why)",
                "serving": "down"}
    return {"status": model.status, "serving": "ok" if model.status == "unloaded" else "degraded"}


def _rotation(replica) -> dict:
    """The gateway's own view of a replica of a routed model: its requests in flight, and whether it is out."""
    if replica.route.name is None:
        return {}
    view = {"in_flight": replica.in_flight, "ejected": replica.ejected}
    if replica.ejected:
        view["consecutive_failures"] = replica.failures
    return view


def init_health(app, ttl_s):
    """Give app its health probe."""
    app.extensions["health_probe"] = HealthProbe(app.extensions["upstream"], app.extensions["router"], ttl_s,
                                                 app.extensions["gateway_metrics"].upstream_up,
                                                 app.extensions.get("model_pool"))
