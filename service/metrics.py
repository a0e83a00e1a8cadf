"""GET /metrics: Prometheus text from prometheus-flask-exporter's default request metrics."""
from prometheus_client import CollectorRegistry
from prometheus_flask_exporter import PrometheusMetrics


def init_metrics(app) -> PrometheusMetrics:
    """Serve /metrics for app, with a registry of its own so that several apps can live in one process."""
    metrics = PrometheusMetrics(app, registry=CollectorRegistry(), group_by="url_rule", defaults_prefix="gateway")
    app.extensions["metrics"] = metrics
    return metrics
