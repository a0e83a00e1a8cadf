"""Routing by model: each model name has its replicas (llama-servers); a request goes to the least busy one and
moves to another when the one it tried never took it. A replica that keeps failing to take requests rests for a
cooldown and is probed before it takes traffic again.

With MODEL_UPSTREAMS unset there is one route, for any model name, to LLAMA_SERVER_URL: the gateway as before.
"""
import logging
import threading
import time

from ..converters import public_url
from ..errors import ApiError, InvalidRequest, UpstreamError, UpstreamUnavailable
from .affinity import AffinityTable

log = logging.getLogger(__name__)

# An upstream answering with one of these never took the request: another replica may.
FAILOVER_STATUSES = (502, 503)


class ModelNotFound(ApiError):
    """The request names a model no route serves."""

    status = 404
    code = "model_not_found"

    def __init__(self, name):
        shown = name if len(name) <= 128 and name.isprintable() else name[:128].encode("unicode_escape").decode()
        super().__init__(f"The model '{shown}' does not exist on this gateway; GET /v1/models lists the models",
                         type="invalid_request_error", param="model")


class Replica:
    """One llama-server serving one model, with its load and failure counts (guarded by its route's lock)."""

    def __init__(self, route, url):
        self.route = route
        self.url = url
        self.label = public_url(url)  # for logs, metrics and /health: never a password
        self.in_flight = 0
        self.failures = 0  # consecutive
        self.ejected_until = None  # monotonic time the cooldown ends; None while in rotation
        self.probing = False
        self.served = self.failed = self.ejections = 0
        self.slots = None  # llama.cpp's slot count, once known (scheduler.SlotCounts)

    @property
    def ejected(self) -> bool:
        """True while out of rotation."""
        return self.ejected_until is not None

    def release(self):
        """End one request this replica was given."""
        with self.route.lock:
            self.in_flight -= 1


class ModelRoute:
    """A model name and its replicas; name is None for the one route that takes any name."""

    def __init__(self, name, urls, *, retries=2, eject_after=3, cooldown_s=10.0, probe=None, clock=time.monotonic):
        self.name = name
        self.retries = retries  # failovers one request may make
        self.replicas = [Replica(self, url) for url in urls]
        self.eject_after = eject_after
        self.cooldown = cooldown_s
        self.probe = probe  # probe(url) -> bool: does the replica's /health answer 200?
        self.clock = clock
        self.lock = threading.Lock()
        self._next = 0  # where the round-robin among equally busy replicas starts
        self.metadata = None  # the upstream's /v1/models entry, once one replica told it
        self.created = int(time.time())  # for /v1/models until then
        self.affinity = AffinityTable() if len(urls) > 1 else None  # where each prompt prefix was last served

    def pick(self, exclude=(), keys=None, record=None) -> Replica:
        """Take the replica that last served the longest prefix of this prompt (keys: affinity.prefix_keys)
        unless it is busier than the least busy one by too much, else the one with the fewest requests in flight
        (ties round-robin), preferring those in rotation and not yet tried; count the request on it."""
        replicas = self.replicas
        with self.lock:
            now = self.clock()
            if len(replicas) == 1:
                chosen = replicas[0]
            else:
                chosen = self._least_busy(now, exclude)
                if keys and record is not None and record.affinity is None:
                    chosen, record.affinity = self._cache_aware(chosen, keys, exclude)
                self._next = (replicas.index(chosen) + 1) % len(replicas)
            chosen.in_flight += 1
            due = [replica for replica in replicas if self._probe_due(replica, now)]
        for replica in due:
            threading.Thread(target=self._run_probe, args=(replica,), name="replica-probe", daemon=True).start()
        return chosen

    def _cache_aware(self, least, keys, exclude) -> tuple:
        """(replica, hit | miss | overflow): the one whose prompt cache likely holds this prompt's beginning,
        if it has a free slot (or, slots unknown, at most one request more than the least busy)."""
        cached = self.affinity.lookup(keys)
        if cached is None or cached.ejected or cached in exclude:
            return least, "miss"
        roomy = cached.in_flight < cached.slots if cached.slots else cached.in_flight <= least.in_flight + 1
        return (cached, "hit") if cached is least or roomy else (least, "overflow")

    def _least_busy(self, now, exclude):
        ordered = self.replicas[self._next:] + self.replicas[:self._next]
        candidates = ([r for r in ordered if not r.ejected and r not in exclude]
                      or [r for r in ordered if r not in exclude]
                      or ordered)  # every replica failed this request: one more try, least busy first
        return min(candidates, key=lambda replica: replica.in_flight)  # min keeps the first of equals

    def succeeded(self, replica):
        """A replica answered: it is healthy (and back in rotation, if it was out)."""
        with self.lock:
            replica.served += 1
            replica.failures = 0
            if replica.ejected:
                replica.ejected_until = None
                log.info("replica back in rotation", extra={"fields": {"model": self.name, "replica": replica.label}})

    def failed(self, replica, error):
        """A replica could not serve. Every failure counts in its metric; those that show the replica unwell
        count toward ejection, and after eject_after in a row it leaves rotation for the cooldown."""
        with self.lock:
            replica.failed += 1
            if not shows_unwell(error):
                return
            replica.failures += 1
            if replica.failures < self.eject_after or replica.ejected or len(self.replicas) == 1:
                return
            replica.ejected_until = self.clock() + self.cooldown
            replica.ejections += 1
        log.warning("replica ejected", extra={"fields": {
            "model": self.name, "replica": replica.label, "failures": replica.failures, "cooldown_s": self.cooldown,
            "reason": error.message}})

    def probed(self, replica, ok: bool):
        """Take a /health probe's word: an ejected replica past its cooldown returns when ok, else rests again."""
        self._take_word(replica, ok, ends_probe=False)

    def _take_word(self, replica, ok, ends_probe):
        with self.lock:
            if ends_probe:
                # Only the probe that set the flag clears it (a /health probe may finish while it runs), and with
                # its answer applied, so that no pick in between starts a second one.
                replica.probing = False
            if not replica.ejected or self.clock() < replica.ejected_until:
                return
            if not ok:
                replica.ejected_until = self.clock() + self.cooldown
                return
            replica.ejected_until = None
            replica.failures = 0
        log.info("replica back in rotation", extra={"fields": {"model": self.name, "replica": replica.label}})

    def _probe_due(self, replica, now) -> bool:
        if replica.ejected and not replica.probing and now >= replica.ejected_until and self.probe is not None:
            replica.probing = True  # until the probe this starts ends (_run_probe)
            return True
        return False

    def _run_probe(self, replica):
        try:
            ok = self.probe(replica.url)
        except Exception:  # a probe that cannot run says the replica is not back
            ok = False
        self._take_word(replica, ok, ends_probe=True)

    def send(self, send, record=None, keys=None):
        """Call send(replica) on the replica pick() chooses and return (replica, its response). On an error that
        shows the replica never took the request, try another one not tried yet; never after an answer began.

        The replica stays counted in flight until its release() (when the answer has been relayed).
        """
        tried = []
        while True:
            replica = self.pick(tried, keys, record)
            try:
                response = send(replica)
            except UpstreamError as error:
                replica.release()
                if error.kind is None:  # the client's mistake (a 4xx), not the replica's
                    raise
                self.failed(replica, error)
                tried.append(replica)
                if not fails_over(error) or len(tried) >= len(self.replicas) or len(tried) > self.retries:
                    _count_failovers(record, len(tried) - 1)
                    raise
                continue
            except BaseException:  # cut because the client left or the gateway is stopping
                replica.release()
                raise
            self.succeeded(replica)
            if keys and self.affinity is not None:
                self.affinity.remember(keys, replica)  # the one that took it: its cache now holds this prompt
            _count_failovers(record, len(tried))
            return replica, response


def _count_failovers(record, failovers):
    if record is not None and failovers:
        record.retries = (record.retries or 0) + failovers


def fails_over(error: UpstreamError) -> bool:
    """True when the replica never took the request: no connection, or a 502/503 instead of an answer."""
    # A connection closed before any answer may have been closed by a llama.cpp that read the request and died on
    # it: sent elsewhere, the same prompt could take that replica down too (upstream.py retries a stale one once).
    return shows_unwell(error) and getattr(error, "kind", None) != "reset"


def shows_unwell(error: UpstreamError) -> bool:
    """True when a failure says the replica itself is unwell: no connection, closed before any answer, a
    502/503. A replica that took the request and then failed on it (a 500) or took too long (a read timeout) may
    have been given a request that would fail anywhere: one client's bad input must not take a model's replicas
    out of rotation."""
    if error.upstream_status is not None:
        return error.upstream_status in FAILOVER_STATUSES
    return isinstance(error, UpstreamUnavailable)


class Router:
    """Finds the route for a request's model."""

    def __init__(self, routes, fallback=None):
        self.routes = {route.name: route for route in routes}
        self.fallback = fallback  # the route of any name (LLAMA_SERVER_URL mode)

    @classmethod
    def from_settings(cls, settings, probe=None):
        """Routes from MODEL_UPSTREAMS, or one route for any model to LLAMA_SERVER_URL."""
        options = {"retries": settings["UPSTREAM_RETRIES"], "eject_after": settings["REPLICA_EJECT_AFTER"],
                   "cooldown_s": settings["REPLICA_COOLDOWN_S"], "probe": probe}
        if settings["MODEL_UPSTREAMS"]:
            return cls([ModelRoute(name, urls, **options) for name, urls in settings["MODEL_UPSTREAMS"].items()])
        return cls([], fallback=ModelRoute(None, [settings["LLAMA_SERVER_URL"]], **options))

    @property
    def all_routes(self) -> list:
        """Every route, the fallback included."""
        return list(self.routes.values()) + ([self.fallback] if self.fallback else [])

    def route(self, model) -> ModelRoute:
        """The route for model, or a 4xx saying why there is none."""
        if self.fallback is not None:
            return self.fallback
        if model is None:
            raise InvalidRequest("Missing 'model': this gateway serves several models; GET /v1/models lists them",
                                 param="model")
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(model)
        return route


def upstream_targets(router, retries) -> dict:
    """Each replica's base URL and its own retries: a model with replicas moves to another one instead."""
    return {replica.url: retries if len(route.replicas) == 1 else 0
            for route in router.all_routes for replica in route.replicas}
