"""The key and usage database in /metrics: whether it answers, usage waiting to be written, usage dropped."""
import re


def metric(text, name) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


def test_metrics_say_whether_the_database_answers_and_what_usage_waits_or_was_dropped(make_app, httpserver, tmp_path):
    app = make_app(httpserver.url_for("").rstrip("/"), DATABASE_URL=f"sqlite:///{tmp_path / 'gateway.db'}")
    store = app.extensions["store"]
    client = app.test_client()
    text = client.get("/metrics").get_data(as_text=True)
    assert metric(text, "gateway_database_up") == 1
    assert metric(text, "gateway_usage_dropped_rows_total") == 0
    store.usage.dropped = 3  # as an outage longer than the memory bound would leave it
    store.usage.record("env:team", "chat", 10, 5, error=False, queue_ms=None, upstream_ms=None)
    text = client.get("/metrics").get_data(as_text=True)
    assert metric(text, "gateway_usage_dropped_rows_total") == 3
    assert metric(text, "gateway_usage_pending_rows") in (0, 1)  # the store's thread may have written it already
    store.health.healthy = False
    assert metric(client.get("/metrics").get_data(as_text=True), "gateway_database_up") == 0


def test_no_database_no_database_metrics(make_app, httpserver):
    text = make_app(httpserver.url_for("").rstrip("/")).test_client().get("/metrics").get_data(as_text=True)
    assert "gateway_database_up" not in text
