"""Routing by model: each model (a ModelSpec: its id and aliases) has its replicas (llama-servers) and its request
rules; a request goes to the least busy replica and moves to another when the one it tried never took it. A
replica that keeps failing to take requests rests for a cooldown and is probed before it takes traffic again.

Where one model takes any name (LLAMA_SERVER_URL, or one local model chosen without names) there is one route,
the fallback, as one llama-server does. The routes change while the gateway runs (Router.apply, a reload of the
models file): readers never lock, they read one table, which a change replaces whole.
"""
import logging
import threading
import time
from types import MappingProxyType
from typing import NamedTuple

from ..config import ConfigError
from ..converters import public_url
from ..errors import ApiError, InvalidRequest, UpstreamError, UpstreamUnavailable
from ..models.environment import upstream_models
from ..models.spec import ModelSet, ModelSpec
from .affinity import AffinityTable
from .request_rules import RequestRules

log = logging.getLogger(__name__)

# An upstream answering with one of these never took the request: another replica may.
FAILOVER_STATUSES = (502, 503)


class ModelNotFound(ApiError):
    """The request names a model no route serves."""

    status = 404
    code = "model_not_found"

    def __init__(self, name):
        self.shown = shown = name if len(name) <= 128 and name.isprintable() \
            else name[:128].encode("unicode_escape").decode()
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
    """A model name and its replicas; name is None for the one route that takes any name. spec is the model it
    serves (None for a route built by hand), rules its RequestRules (None: none, which costs a request nothing)."""

    def __init__(self, name, urls, *, spec=None, rules=None, retries=2, eject_after=3, cooldown_s=10.0, probe=None,
                 clock=time.monotonic):
        self.name = name
        self.spec = spec
        self.rules = rules
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
        self.removed = False  # a reload removed its model: a request that found it just before gets a 404

    def pick(self, exclude=(), keys=None, record=None) -> Replica:
        """Take the replica that last served the longest prefix of this prompt (keys: affinity.prefix_keys)
        unless it is busier than the least busy one by too much, else the one with the fewest requests in flight
        (ties round-robin), preferring those in rotation and not yet tried; count the request on it."""
        with self.lock:
            replicas = self.replicas  # read under the lock: update() may replace the list
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
        if cached is None or cached.ejected or cached in exclude or cached not in self.replicas:  # or dropped
            return least, "miss"
        roomy = cached.in_flight < cached.slots if cached.slots else cached.in_flight <= least.in_flight + 1
        return (cached, "hit") if cached is least or roomy else (least, "overflow")

    def _least_busy(self, now, exclude):
        ordered = self.replicas[self._next:] + self.replicas[:self._next]
        candidates = ([r for r in ordered if not r.ejected and r not in exclude]
                      or [r for r in ordered if r not in exclude]
                      or ordered)  # every replica failed this request: one more try, least busy first
        return min(candidates, key=lambda replica: replica.in_flight)  # min keeps the first of equals

    @property
    def aliases(self) -> tuple:
        """The other names clients may send for this route's model."""
        return self.spec.aliases if self.spec is not None else ()

    def update(self, spec, urls, rules):
        """Take a reloaded spec: its names and rules at once; its replicas as urls lists them, each one kept
        (with its counts and state) where the URL stays. A request on a dropped replica finishes there."""
        with self.lock:
            kept = {replica.url: replica for replica in self.replicas}
            self.replicas = [kept.get(url) or Replica(self, url) for url in urls]
            if self.spec is not None and spec.identity() != self.spec.identity():
                for replica in self.replicas:
                    replica.slots = None  # another llama.cpp command line (--parallel): its slots are asked again
            if len(self.replicas) < 2:
                self.affinity = None
            elif self.affinity is None:
                self.affinity = AffinityTable()
            self.spec, self.rules = spec, rules

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


class RouteTable(NamedTuple):
    """The routes at one moment: read whole by a request, replaced whole by a change."""

    routes: dict  # model id -> its route (the fallback is not here)
    aliases: MappingProxyType  # every alias -> its model's route
    fallback: object  # the route of any name, or None


class RouteChanges(NamedTuple):
    """What Router.apply did, by model id."""

    added: tuple
    removed: tuple
    updated: tuple  # the same model, with new names, rules or replicas (a new route where it switched between
    # taking any name and its own names)


class Router:
    """Finds the route for a request's model; apply() changes the routes while requests run."""

    def __init__(self, routes, fallback=None, *, options=None, on_target=None):
        self.options = options or {}  # the ModelRoute options of the routes apply() adds
        self.on_target = on_target  # on_target(url, retries): mount a replica the routes did not have yet
        self._changing = threading.Lock()  # one change at a time; readers never take it
        self.models = None  # the ModelSet last applied (None for routes built by hand)
        self._publish(list(routes), fallback)

    @classmethod
    def from_models(cls, model_set: ModelSet, local_urls=None, **options):
        """One route per model of model_set (its id, its aliases), to its upstreams and the llama.cpp the gateway
        runs for it (local_urls: model id -> URL); options: ModelRoute's (retries, eject_after, probe, ...)."""
        router = cls([], options=options)
        router.apply(model_set, local_urls)
        return router

    @classmethod
    def from_settings(cls, settings, probe=None):
        """Routes from MODEL_UPSTREAMS, or one route for any model to LLAMA_SERVER_URL."""
        return cls.from_models(upstream_models(settings), **route_options(settings, probe))

    @property
    def routes(self) -> dict:
        """Each model's route by its id (the fallback is not among them)."""
        return self._table.routes

    @property
    def fallback(self):
        """The route of any name (LLAMA_SERVER_URL mode), or None."""
        return self._table.fallback

    @property
    def all_routes(self) -> list:
        """Every route, the fallback included."""
        table = self._table
        return list(table.routes.values()) + ([table.fallback] if table.fallback else [])

    def route(self, model) -> ModelRoute:
        """The route for model (an id or an alias), or a 4xx saying why there is none."""
        table = self._table  # one read: a change meanwhile replaces the table, never changes this one
        if table.fallback is not None:
            return table.fallback
        if model is None:
            raise InvalidRequest("Missing 'model': this gateway serves several models; GET /v1/models lists them",
                                 param="model")
        route = table.routes.get(model) or table.aliases.get(model)
        if route is None:
            raise ModelNotFound(model)
        return route

    def apply(self, model_set: ModelSet, local_urls=None) -> RouteChanges:
        """Route model_set from now on: a new model gets a route; a removed one's name is unknown at once (its
        requests in flight keep their route); a model still there keeps its route object (its counts, its
        queue, its local model), updated in place with its names, rules and replicas."""
        local_urls = local_urls or {}
        if model_set.any_name and len(model_set.specs) != 1:
            raise ConfigError("a gateway that takes any model name serves exactly one model")
        with self._changing:
            before = {route.spec.id: route for route in self.all_routes if route.spec is not None}
            # Everything checked before anything changes: a model set that cannot be routed changes nothing.
            plan = [(spec, replica_urls(spec, local_urls), rules_of(spec), before.get(spec.id))
                    for spec in model_set.specs]
            retries = self.options.get("retries", 2)
            for _, urls, _, _ in plan:  # each replica mounted before a request can be routed there
                for url in urls if self.on_target is not None else ():
                    self.on_target(url, retries if len(urls) == 1 else 0)
            added, updated, routes = [], [], []
            for spec, urls, rules, route in plan:
                name = None if model_set.any_name else spec.id
                if route is None or route.name != name:  # a model that takes any name is another route
                    (added if route is None else updated).append(spec.id)
                    route = ModelRoute(name, urls, spec=spec, rules=rules, **self.options)
                elif route.spec != spec or [replica.url for replica in route.replicas] != urls:
                    route.update(spec, urls, rules)
                    updated.append(spec.id)
                routes.append(route)
            kept = {route.spec.id for route in routes}
            removed = [model_id for model_id in before if model_id not in kept]
            for model_id in removed:
                before[model_id].removed = True
            self._publish([] if model_set.any_name else routes, routes[0] if model_set.any_name else None)
            self.models = model_set
        return RouteChanges(tuple(added), tuple(removed), tuple(updated))

    def _publish(self, routes, fallback):
        aliases = {alias: route for route in routes for alias in route.aliases}
        # Where a name is both a model's id and another's alias (the models file refuses it), the id wins.
        self._table = RouteTable({route.name: route for route in routes}, MappingProxyType(aliases), fallback)


def route_options(settings, probe=None) -> dict:
    """ModelRoute's options from the settings."""
    return {"retries": settings["UPSTREAM_RETRIES"], "eject_after": settings["REPLICA_EJECT_AFTER"],
            "cooldown_s": settings["REPLICA_COOLDOWN_S"], "probe": probe}


def replica_urls(spec: ModelSpec, local_urls) -> list:
    """A model's replicas: its upstreams, then the llama.cpp the gateway runs for it (if any)."""
    local = local_urls.get(spec.id)
    urls = [*spec.upstreams, *([local] if local and local not in spec.upstreams else [])]
    if not urls:
        raise ConfigError(f"models.{spec.id}: no llama-server to route to (no upstreams, and none runs it here)")
    return urls


def rules_of(spec: ModelSpec):
    """The spec's request rules, or None where it has none (then a request pays nothing for them)."""
    try:
        rules = RequestRules(spec.default_fields(), spec.limits.max_tokens, spec.limits.strip)
    except ValueError as error:
        raise ConfigError(f"models.{spec.id}: {error}") from None
    return rules or None


def upstream_targets(router, retries) -> dict:
    """Each replica's base URL and its own retries: a model with replicas moves to another one instead."""
    return {replica.url: retries if len(route.replicas) == 1 else 0
            for route in router.all_routes for replica in route.replicas}
