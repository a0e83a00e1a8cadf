"""What happened over time, per model and overall: requests/s, errors, tokens/s, time to first token (p50, p95) and
queue depth over the last hour (10 s steps) and the last day (5 min steps), for the operators' page's charts.

Fixed-size rings in memory: a bucket's slot is reused once time has moved a whole window past it, so memory is
bounded whatever the traffic: per series and window one bucket per step, each with a bounded sample of times to
first token. Series exist for the router's routes alone (a name the client made up counts in "*" only). Lost at a
restart, as the page says (gateway.started_at).
"""
import logging
import math
import random
import threading
import time
import weakref

# window -> (seconds per bucket, buckets): an hour of 10 s steps, a day of 5 min steps.
WINDOWS = {"hour": (10.0, 360), "day": (300.0, 288)}
TTFT_SAMPLE = 64  # times to first token kept per bucket (a reservoir): the percentiles' bound on memory
SAMPLE_S = 5.0  # how often the queue depth is sampled (twice per hour bucket), requests or none
ALL = "*"

log = logging.getLogger(__name__)


class Bucket:
    """One step of one series: what ended in it, and the deepest queue sampled in it."""

    __slots__ = ("number", "requests", "errors", "tokens", "ttft", "ttft_seen", "depth")

    def __init__(self, number):
        self.number = number  # the step's number since the epoch: tells a live bucket from a stale one
        self.requests = self.errors = self.tokens = self.ttft_seen = 0
        self.ttft = []
        self.depth = None  # None: never sampled (the gateway was not running then)


class Ring:
    """One series over one window: size buckets of step seconds, each slot reused as time moves on."""

    def __init__(self, step_s, size):
        self.step, self.size = step_s, size
        self._buckets = [None] * size

    def bucket(self, now) -> Bucket:
        """The bucket for now, a fresh one where its slot still holds an older step's."""
        number = int(now // self.step)
        bucket = self._buckets[number % self.size]
        if bucket is None or bucket.number != number:
            bucket = self._buckets[number % self.size] = Bucket(number)
        return bucket

    def series(self, now) -> dict:
        """The window ending with now's bucket, oldest first: empty steps as zero (queue depth: None)."""
        last = int(now // self.step)
        shown = {"t": [], "requests_per_s": [], "errors": [], "tokens_per_s": [], "ttft_p50_ms": [],
                 "ttft_p95_ms": [], "queue_depth": []}
        for number in range(last - self.size + 1, last + 1):
            bucket = self._buckets[number % self.size]
            if bucket is None or bucket.number != number:
                bucket = Bucket(number)
            ttft = sorted(bucket.ttft)
            shown["t"].append(number * self.step)
            shown["requests_per_s"].append(bucket.requests / self.step)
            shown["errors"].append(bucket.errors)
            shown["tokens_per_s"].append(bucket.tokens / self.step)
            shown["ttft_p50_ms"].append(percentile(ttft, 50))
            shown["ttft_p95_ms"].append(percentile(ttft, 95))
            shown["queue_depth"].append(bucket.depth)
        return shown


def percentile(ordered, p):
    """The nearest-rank p-th percentile of an ordered list; None when it is empty."""
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 2)


def failed(entry) -> bool:
    """A request that failed: an error status, or an error after its 200 (a stream that broke, a client gone)."""
    return entry.get("status", 500) >= 400 or "error" in entry


class History:
    """Every series' rings. models() names the series kept beside "*" (the router's routes); depths() gives each
    model's requests waiting now (the scheduler's queues, and those waiting for a load)."""

    def __init__(self, models=tuple, depths=dict, clock=time.time, sample_s=SAMPLE_S):
        self.models, self.depths, self.clock = models, depths, clock
        self.sample_s = sample_s  # None: no sampler thread (tests call sample() themselves)
        self._rings = {}  # (window, series name) -> Ring
        self._random = random.Random()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler = None

    def record(self, entry: dict):
        """Count one finished request (a request log entry) in "*" and in its model's series, at its end."""
        self._start_sampler()
        now, model = self.clock(), entry.get("model")
        names = [ALL] + ([model] if model is not None and model in set(self.models()) else [])
        ttft = entry.get("ttft_ms")
        with self._lock:
            for window in WINDOWS:
                for name in names:
                    bucket = self._ring(window, name).bucket(now)
                    bucket.requests += 1
                    bucket.errors += failed(entry)
                    bucket.tokens += entry.get("completion_tokens") or 0  # tokens generated: the throughput
                    if ttft is not None:
                        self._keep_ttft(bucket, ttft)

    def sample(self):
        """Note each model's queue depth now (and their sum in "*"): the deepest of a bucket is shown."""
        depths, now = self.depths(), self.clock()
        known = set(self.models())
        with self._lock:
            for window in WINDOWS:
                for name, depth in [(ALL, sum(depths.values()))] + [
                        (name, depth) for name, depth in depths.items() if name in known]:
                    bucket = self._ring(window, name).bucket(now)
                    bucket.depth = max(bucket.depth or 0, depth)

    def series(self, window: str) -> dict:
        """The window's JSON: {"window", "step_s", "start", "series": {"*": {...}, model: {...}}}."""
        self._start_sampler()
        self.sample()  # the current bucket shows the queue as it is now
        step, size = WINDOWS[window]
        now, names = self.clock(), [ALL, *self.models()]
        with self._lock:
            for key in [key for key in self._rings if key[1] not in names]:
                del self._rings[key]  # a model a reload removed: its series goes with it
            series = {name: self._ring(window, name).series(now) for name in names}
        return {"window": window, "step_s": step, "start": (int(now // step) - size + 1) * step, "series": series}

    def stop(self):
        """Stop the sampler thread (it also ends by itself once this History is gone)."""
        self._stop.set()

    def _ring(self, window, name) -> Ring:
        ring = self._rings.get((window, name))
        if ring is None:
            ring = self._rings[(window, name)] = Ring(*WINDOWS[window])
        return ring

    def _keep_ttft(self, bucket, ttft):
        # Reservoir sampling: every request of the bucket equally likely to be kept, TTFT_SAMPLE at most.
        bucket.ttft_seen += 1
        if len(bucket.ttft) < TTFT_SAMPLE:
            bucket.ttft.append(ttft)
        else:
            kept = self._random.randrange(bucket.ttft_seen)
            if kept < TTFT_SAMPLE:
                bucket.ttft[kept] = ttft

    def _start_sampler(self):
        # Started on first use, not when the app is built (tests build hundreds of apps); it holds the History
        # weakly, so that an app that is gone takes its thread with it.
        if self._sampler is not None or self.sample_s is None:
            return
        with self._lock:
            if self._sampler is not None:
                return
            self._sampler = threading.Thread(target=_sample_while_kept, name="history-sampler", daemon=True,
                                             args=(weakref.ref(self), self._stop, self.sample_s))
            self._sampler.start()


def _sample_while_kept(history_ref, stop, every_s):
    while not stop.wait(every_s):
        history = history_ref()
        if history is None:
            return
        try:
            history.sample()
        except Exception:  # noqa: BLE001 - a failed sample leaves a gap in the chart, not a dead thread
            log.debug("sampling the queue depth failed", exc_info=True)
        del history
