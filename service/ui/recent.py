"""The last requests, as their log lines tell them (service/operations/request_log.py feeds this), and each
client's requests and tokens over the last hour: what the operators' page shows. Never a prompt or an answer.

Bounded whatever the traffic: a ring of the last requests, and per client one counter per BUCKET_S over the hour.
Clients are bounded too: a client id is one of the configured keys' (or anonymous, admin), never the client's word.
"""
import collections
import math
import threading
import time

from ..operations.history import failed
from ..policy.hooks import UNLIMITED_RULES

HOUR_S = 3600.0
BUCKET_S = 10.0  # the counts' resolution: a rate-limit window is summed from whole buckets
RECENT_SIZE = 100
# Requests refused before anyone was known to have sent them (no key, a wrong one) have a ring of their own: a
# flood of them, which needs no key, must not push the real requests off the page.
REFUSED_SIZE = 20
# Refused by the limits themselves or before them (policy/hooks.py begin_request): the client's rate limits, a
# stored key's spent budget, the shared limits' store out of reach, a client key on an admin route. The limiter
# never counted them, and neither does the window shown beside the limits (else a client limited to 3 a minute
# would show "4 of 3"). The gateway's own codes: llama.cpp's 429 is passed on as rate_limit_error.
NOT_COUNTED_BY_LIMITS = ("rate_limit_exceeded", "budget_exceeded", "rate_limit_store_unavailable",
                         "admin_key_required")


def counts_against_limits(entry) -> bool:
    """Whether the limiter counted the request in its client's window, as its log line tells: not a model listing
    (under no limit), not one refused by the limits or before it reached them."""
    return entry.get("route") not in UNLIMITED_RULES and entry.get("error") not in NOT_COUNTED_BY_LIMITS


class RecentRequests:
    """A ring buffer of the last requests' log fields, and per-client counts over the last hour."""

    def __init__(self, size=RECENT_SIZE, clock=time.time):
        self.clock = clock
        self._entries = collections.deque(maxlen=size)
        self._refused = collections.deque(maxlen=REFUSED_SIZE)
        self._added = 0  # entries taken so far: the order of both rings together
        # client id -> deque of [bucket number, requests, tokens, failures, requests the limits count], oldest first
        self._buckets = {}
        self._lock = threading.Lock()

    def add(self, entry: dict):
        """Take one finished request's log fields (with its route and arrival time)."""
        with self._lock:
            self._added += 1
            client = entry.get("client_id")
            if client is None:
                # Refused before it was known whose it was: listed, nobody's count.
                self._refused.append((self._added, entry))
                return
            self._entries.append((self._added, entry))
            buckets = self._buckets.setdefault(client, collections.deque())
            number = int(entry["time"] // BUCKET_S)
            if not buckets or buckets[-1][0] < number:
                buckets.append([number, 0, 0, 0, 0])
            # A request that came before the newest bucket's start (a long stream) counts in the newest.
            bucket = buckets[-1]
            bucket[1] += 1
            bucket[2] += entry.get("prompt_tokens", 0) + entry.get("completion_tokens", 0)
            bucket[3] += failed(entry)  # a stream that broke after its 200 too
            bucket[4] += counts_against_limits(entry)
            self._prune(buckets)

    def latest(self) -> list:
        """The last requests' entries, newest first."""
        with self._lock:
            entries = list(self._entries) + list(self._refused)
        return [entry for _, entry in sorted(entries, key=lambda item: item[0], reverse=True)]  # by arrival here

    def by_client(self, window_s: float) -> dict:
        """Per client seen in the last hour: {"requests", "tokens", "failures"} over the hour, and
        "window_requests", "window_tokens" over the last window_s (the rate limits' window), summed over whole
        buckets: up to BUCKET_S more than the window, so that the headroom shown is never more than there is."""
        since = math.floor((self.clock() - window_s) / BUCKET_S)
        counts = {}
        with self._lock:
            for client, buckets in list(self._buckets.items()):
                self._prune(buckets)
                if not buckets:
                    del self._buckets[client]
                    continue
                recent = [bucket for bucket in buckets if bucket[0] >= since]
                counts[client] = {"requests": sum(b[1] for b in buckets), "tokens": sum(b[2] for b in buckets),
                                  "failures": sum(b[3] for b in buckets),
                                  "window_requests": sum(b[4] for b in recent),
                                  "window_tokens": sum(b[2] for b in recent)}
        return counts

    def _prune(self, buckets):
        oldest = math.floor((self.clock() - HOUR_S) / BUCKET_S) + 1
        while buckets and buckets[0][0] < oldest:
            buckets.popleft()
