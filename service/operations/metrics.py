"""GET /metrics: Prometheus text. prometheus-flask-exporter serves it with its default request metrics; the
gateway adds its own, observed once per request from its record, and optionally llama.cpp's own metrics.

Label values are bounded: routes are URL rules (one "unmatched" for everything else), clients are configured
ids, never raw URLs, request ids or keys.
"""
import logging
import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_flask_exporter import PrometheusMetrics

from ..proxy.disconnect import CLIENT_STALLED
from .model_metrics import init_model_metrics
from .store_metrics import StoreCollector
from .warm_metrics import WarmCollector

log = logging.getLogger(__name__)

# LLM latencies run from milliseconds (embeddings, cached prompts) to minutes (long generations on a CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """The gateway's own metrics in one registry."""

    def __init__(self, registry):
        self.requests = Counter("gateway_requests", "Requests answered, by route, status and client",
                                ["route", "status", "client"], registry=registry)
        self.duration = Histogram("gateway_request_duration_seconds", "Time from request to the last byte sent",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("gateway_time_to_first_token_seconds", "Time from request to the first streamed event",
                              ["route"], buckets=TTFT_BUCKETS, registry=registry)
        self.upstream_duration = Histogram("gateway_upstream_duration_seconds",
                                           "Time for llama-server to answer (to its headers, for streams)",
                                           ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.upstream_errors = Counter("gateway_upstream_errors", "llama-server failures by kind",
                                       ["kind"], registry=registry)
        self.stalled_streams = Counter("gateway_stalled_streams", "Streams cut because their client stopped "
                                       "reading (STREAM_STALL_TIMEOUT_S)", registry=registry)
        self.retries = Counter("gateway_upstream_retries", "Retries of upstream calls", registry=registry)
        self.rate_limited = Counter("gateway_rate_limited", "Requests refused by a limit, by client and limit",
                                    ["client", "limit"], registry=registry)
        self.limit_store_errors = Counter("gateway_rate_limit_store_errors",
                                          "Calls to the shared rate-limit store (Redis) that failed",
                                          registry=registry)
        self.in_flight = Gauge("gateway_in_flight_requests", "Requests being answered", registry=registry)
        self.open_streams = Gauge("gateway_open_streams", "Streams being relayed", registry=registry)
        self.tokens = Counter("gateway_tokens", "Tokens used, from llama.cpp's usage, by client and kind",
                              ["client", "kind"], registry=registry)
        self.upstream_up = Gauge("gateway_upstream_up", "1 when llama-server last answered, 0 when it could not",
                                 registry=registry)
        self.build_info = Gauge("gateway_build_info", "The gateway's build", ["version", "python"], registry=registry)
        self.build_info.labels(version=__import__("service").__version__, python=platform.python_version()).set(1)
        self._route_children, self._request_children, self._token_children = {}, {}, {}
        self.per_model = None  # model_metrics.QueueMetrics, set by init_metrics

    def observe(self, record):
        """Count one finished request from its record."""
        route, client = record.route, record.client_id or "none"
        per_route = self._route_children.get(route)
        if per_route is None:
            # labels() takes a lock and hashes every call: look each label set up once (their number is bounded).
            per_route = self._route_children[route] = (self.duration.labels(route), self.ttft.labels(route),
                                                        self.upstream_duration.labels(route))
        duration, ttft, upstream_duration = per_route
        key = (route, record.status, client)
        requests = self._request_children.get(key)
        if requests is None:
            requests = self._request_children[key] = self.requests.labels(route, str(record.status), client)
        requests.inc()
        duration.observe(record.elapsed_ms() / 1000)
        if record.ttft_ms is not None:
            ttft.observe(record.ttft_ms / 1000)
        if record.upstream_ms is not None:
            upstream_duration.observe(record.upstream_ms / 1000)
            self.upstream_up.set(0 if record.upstream_error in UNREACHABLE else 1)
        if record.upstream_error:
            self.upstream_errors.labels(record.upstream_error).inc()
        if record.error == CLIENT_STALLED:
            self.stalled_streams.inc()
        if self.per_model is not None:
            self.per_model.observe(record)
        if record.retries:
            self.retries.inc(record.retries)
        if record.rate_limited:
            self.rate_limited.labels(client, record.rate_limited).inc()
        if isinstance(record.prompt_tokens, int) or isinstance(record.completion_tokens, int):
            prompt, completion = self._token_children.get(client) or self._token_children.setdefault(
                client, (self.tokens.labels(client, "prompt"), self.tokens.labels(client, "completion")))
            if isinstance(record.prompt_tokens, int):
                prompt.inc(record.prompt_tokens)
            if isinstance(record.completion_tokens, int):
                completion.inc(record.completion_tokens)


# Upstream failures that mean llama-server is not there to serve.
UNREACHABLE = ("refused", "loading")


class UpstreamMetricsCollector:
    """Adds llama-server's own llamacpp:* metrics to the scrape, so that one target shows both; where the
    gateway routes by model, each sample is labelled with its model and replica."""

    def __init__(self, upstream, router):
        self.upstream = upstream
        self.router = router

    def collect(self):
        """Fetch and re-export the upstreams' metrics; nothing from one that cannot be reached."""
        if self.router.fallback is not None:
            yield from self._families(self.router.fallback.replicas[0].url)
            return
        merged = {}
        for route in self.router.routes.values():
            for replica in route.replicas:
                for family in self._families(replica.url):
                    labels = {"model": route.name, "replica": replica.label}
                    samples = [sample._replace(labels={**sample.labels, **labels}) for sample in family.samples]
                    if family.name in merged:
                        merged[family.name].samples.extend(samples)
                    else:
                        family.samples = samples
                        merged[family.name] = family
        yield from merged.values()

    def _families(self, base_url) -> list:
        try:
            response = self.upstream.request("GET", "/metrics", group="models", base_url=base_url)
            return list(text_string_to_metric_families(response.text))
        except Exception as error:  # a scrape must not fail because an upstream did
            log.debug("llama-server metrics not included: %s", error)
            return []


class ReplicaCollector:
    """Each replica's state, read from the router at scrape time (so the hot path only moves integers)."""

    def __init__(self, router):
        self.router = router

    def collect(self):
        """gateway_replica_* families, labelled by model and replica."""
        labels = ["model", "replica"]
        up = GaugeMetricFamily("gateway_replica_up", "1 while a replica is in rotation, 0 while ejected", labels=labels)
        in_flight = GaugeMetricFamily("gateway_replica_in_flight_requests", "Requests a replica is answering",
                                      labels=labels)
        served = CounterMetricFamily("gateway_replica_requests", "Requests a replica answered", labels=labels)
        failed = CounterMetricFamily("gateway_replica_failures", "Calls to a replica that failed (connect errors, "
                                     "5xx, timeouts)", labels=labels)
        ejections = CounterMetricFamily("gateway_replica_ejections", "Times a replica was taken out of rotation",
                                        labels=labels)
        for route in self.router.all_routes:
            with route.lock:
                for replica in route.replicas:
                    values = [route.name or "*", replica.label]
                    up.add_metric(values, 0 if replica.ejected else 1)
                    in_flight.add_metric(values, replica.in_flight)
                    served.add_metric(values, replica.served)
                    failed.add_metric(values, replica.failed)
                    ejections.add_metric(values, replica.ejections)
        yield from (up, in_flight, served, failed, ejections)


def init_metrics(app, include_upstream=False) -> GatewayMetrics:
    """Serve /metrics for app from a registry of its own (so that several apps can live in one process)."""
    registry = CollectorRegistry()
    # The exporter serves /metrics; its default per-request metrics would only repeat gateway_requests_total
    # and gateway_request_duration_seconds, at a cost on every request.
    exporter = PrometheusMetrics(app, registry=registry, export_defaults=False)
    gateway = GatewayMetrics(registry)
    registry.register(ReplicaCollector(app.extensions["router"]))
    gateway.per_model = init_model_metrics(app, registry)
    if app.extensions.get("warm") is not None:
        registry.register(WarmCollector(app.extensions["warm"]))
    if app.extensions.get("store") is not None:
        registry.register(StoreCollector(app.extensions["store"]))
    if include_upstream:
        registry.register(UpstreamMetricsCollector(app.extensions["upstream"], app.extensions["router"]))
    app.extensions["metrics"] = exporter
    app.extensions["gateway_metrics"] = gateway
    return gateway
