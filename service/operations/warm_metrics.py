"""Warm conversations' metrics (service/warm), read at scrape time: saves and restores by result, the prompt
tokens restored instead of computed, and the saved states on disk. Labels are model names (bounded)."""
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class WarmCollector:
    """gateway_kv_saves_total, gateway_kv_restores_total, gateway_kv_restored_tokens_total, gateway_kv_states,
    gateway_kv_bytes."""

    def __init__(self, warm):
        self.warm = warm  # the app's WarmGateway

    def collect(self):
        """One sample per model and result."""
        saves = CounterMetricFamily("gateway_kv_saves", "Slot states saved to disk, by result (skipped: the disk "
                                    "had no room)", labels=["model", "result"])
        restores = CounterMetricFamily("gateway_kv_restores", "Saved slot states restored for a request, by "
                                       "result (hit: restored; failed, missing, mismatch: the prompt was computed)",
                                       labels=["model", "result"])
        restored = CounterMetricFamily("gateway_kv_restored_tokens", "Prompt tokens restored from disk instead of "
                                       "computed", labels=["model"])
        for model, counts in self.warm.conversations.counters().items():
            for result, count in counts["saves"].items():
                saves.add_metric([model, result], count)
            for result, count in counts["restores"].items():
                restores.add_metric([model, result], count)
            restored.add_metric([model], counts["restored_tokens"])
        states = GaugeMetricFamily("gateway_kv_states", "Slot states saved on disk now", labels=["model"])
        size = GaugeMetricFamily("gateway_kv_bytes", "Bytes the saved slot states take on disk", labels=["model"])
        for model, stats in self.warm.stats().items():
            states.add_metric([model], stats["states"])
            size.add_metric([model], stats["bytes"])
        yield from (saves, restores, restored, states, size)
