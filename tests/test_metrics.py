"""GET /metrics: Prometheus text with the exporter's default request metrics."""
from prometheus_client.parser import text_string_to_metric_families


def scrape(client) -> dict:
    """Parse /metrics into {sample name: [(labels, value)]} with prometheus_client's own parser."""
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_metrics_parse_and_count_requests(fake_client, httpserver):
    httpserver.expect_request("/v1/models").respond_with_json({"data": [{"id": "m"}]})
    fake_client.get("/v1/models")
    fake_client.get("/v1/models")
    fake_client.get("/v1/no-such-route/abc")
    samples = scrape(fake_client)
    totals = {labels["status"]: value for labels, value in samples["gateway_http_request_total"]}
    assert totals == {"200": 2.0, "404": 1.0}
    durations = {(labels["url_rule"], labels["status"]): value
                 for labels, value in samples["gateway_http_request_duration_seconds_count"]}
    assert durations[("/v1/models", "200")] == 2
    # Unknown paths share one label instead of one series per raw URL.
    assert [key for key in durations if key[1] == "404"] == [("None", "404")]
