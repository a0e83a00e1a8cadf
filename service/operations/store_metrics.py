"""The key and usage database's metrics (service/store), read at scrape time: whether it answers, the usage rows
waiting to be written, and those dropped when too many waited through an outage."""
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class StoreCollector:
    """gateway_database_up, gateway_usage_pending_rows, gateway_usage_dropped_rows_total."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        """One sample each."""
        up = GaugeMetricFamily("gateway_database_up", "1 while the key and usage database answers, else 0")
        up.add_metric([], 1 if self.store.healthy else 0)
        pending = GaugeMetricFamily("gateway_usage_pending_rows", "Usage rows (key, model, hour) counted and not "
                                    "yet written to the database")
        pending.add_metric([], self.store.usage.pending)
        dropped = CounterMetricFamily("gateway_usage_dropped_rows", "Usage rows dropped because too many waited "
                                      "for the database through an outage")
        dropped.add_metric([], self.store.usage.dropped)
        yield from (up, pending, dropped)
