"""Reading the gateway's /metrics in tests, with prometheus_client's own parser."""
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


def value(samples, name, **labels) -> float:
    """The value of the sample name whose labels include labels (0 when there is none)."""
    return sum(v for sample_labels, v in samples.get(name, []) if labels.items() <= sample_labels.items())


def replica_samples(app) -> dict:
    """{(metric, model, replica): value} of the gateway_replica_* metrics on /metrics."""
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return {(sample.name, sample.labels["model"], sample.labels["replica"]): sample.value
            for family in text_string_to_metric_families(text) if family.name.startswith("gateway_replica")
            for sample in family.samples}
