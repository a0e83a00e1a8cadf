"""Fair share of llama.cpp's slots: at most `slots` requests in flight on a model's llama-servers, the rest
waiting in the gateway, one queue per client, the next free slot going to the next client in turn.

llama.cpp decodes `slots` requests at once and queues the rest first come, first served, so one client's batch
would starve every other client. Here a request that finds every slot of its model taken waits in its client's
queue; a freed slot goes round robin over the clients with requests waiting, a client with weight N taking N turns
per round (RATE_LIMITS client:weight=N). A waiting request holds no llama.cpp slot (it holds a waitress thread).
With SCHEDULER=fifo requests go straight on, as llama.cpp would take them. Per gateway process: several gateways
in front of one llama-server each keep their own queues.

A numbered queue (a route with one llama-server that the gateway runs, where an id means one llama.cpp slot) also
hands out slot ids (slot_ids.py): a granted turn gets the first free id it prefers (the slot holding its
conversation), else the free one used least recently; the warm-conversation saver may claim an idle slot so that
no request runs there while its state is saved. A preference never makes a request wait while another slot is free.
"""
import collections
import threading
import time
import weakref

from ..errors import ApiError
from .slot_ids import SlotIds

# How often a waiting request checks whether its client is still there.
GONE_CHECK_S = 0.25
# A model's slot count is asked of its llama-server (/props); after a failed ask, again after this long.
SLOTS_RETRY_S = 10.0


class QueueFull(ApiError):
    """The client already has QUEUE_MAX_PER_CLIENT requests waiting for this model."""

    status = 429
    code = "queue_full"

    def __init__(self, model, limit):
        super().__init__(f"Too many requests waiting for the model{_named(model)}: at most {limit} per client "
                         "(QUEUE_MAX_PER_CLIENT); wait for some to finish", type="rate_limit_error",
                         headers={"Retry-After": "1"})


class QueueTimeout(ApiError):
    """A request waited QUEUE_TIMEOUT_S for a slot."""

    status = 503
    code = "queue_timeout"

    def __init__(self, model, waited_s):
        super().__init__(f"No slot of the model{_named(model)} came free within {waited_s:g} s (QUEUE_TIMEOUT_S); "
                         "try again later", type="server_error", headers={"Retry-After": "5"})


def _named(model) -> str:
    return f" '{model}'" if model else ""


class Turn:
    """One request's place: waiting in its client's queue, then holding a slot until released (exactly once)."""

    def __init__(self, queue, client, weight, prefer=()):
        self.queue = queue
        self.client = client
        self.weight = weight
        self.prefer = tuple(prefer)  # slot ids in order of preference (numbered queues)
        self.slot = None  # the slot id granted, in a numbered queue whose slot count is known
        self.granted = False
        self.done = False
        self.entered = queue.clock()
        self.waited_s = 0.0

    def wait(self, timeout, gone=None) -> bool:
        """Wait up to timeout for a slot; True once granted. Raise QueueTimeout past the queue's own timeout, and
        leave the queue (False) if gone() says the client left, or raising what gone() raises (ShuttingDown)."""
        return self.queue._wait(self, timeout, gone)

    def release(self):
        """Give the slot back (or leave the queue); a second call does nothing."""
        self.queue._release(self)


class FairQueue:
    """The slots of one model and the requests waiting for them, per client."""

    def __init__(self, name, slots, *, timeout_s, max_per_client, clock=time.monotonic, numbered=None):
        self.name = name
        self.slots = slots  # slots() -> the model's slot count now, or None while unknown (no limit)
        # numbered() -> True while the queue hands out slot ids; asked at each grant (a reload may change it).
        self.numbered = numbered or (lambda: False)
        self.timeout = timeout_s
        self.max_per_client = max_per_client
        self.clock = clock
        self.in_flight = 0
        self._waiting = {}  # client -> deque of Turns, in arrival order
        self._order = collections.deque()  # clients with requests waiting, the next to be served first
        self._credit = {}  # turns the client at the front has left this round
        self._ids = SlotIds(clock)
        self._changed = threading.Condition()

    @property
    def depth(self) -> int:
        """Requests waiting now."""
        with self._changed:
            return sum(len(turns) for turns in self._waiting.values())

    def waiting_by_client(self) -> dict:
        """Requests waiting now, per client."""
        with self._changed:
            return {client: len(turns) for client, turns in self._waiting.items()}

    def enter(self, client, weight=1, prefer=()) -> Turn:
        """A request's Turn: granted at once if a slot is free and nobody waits, else queued (QueueFull when its
        client already has max_per_client waiting); prefer: slot ids in order of preference (numbered queues)."""
        turn = Turn(self, client, max(1, weight), prefer)
        with self._changed:
            room = self._room() if not self._order else None
            if room is not None:
                self._grant(turn, room)
                return turn
            waiting = self._waiting.get(client)
            if waiting is None:
                waiting = self._waiting[client] = collections.deque()
                self._order.append(client)
                self._credit[client] = turn.weight
            elif len(waiting) >= self.max_per_client:
                raise QueueFull(self.name, self.max_per_client)
            waiting.append(turn)
            self._dispatch()  # slots may have grown (a replica came back)
        return turn

    def claim_idle(self, slot) -> bool:
        """Take an idle slot for the saver (numbered queues): False if a turn holds it, it is claimed already or
        no slot is known to be idle. While claimed it is never granted and counts against the slots."""
        with self._changed:
            return self.numbered() and self._ids.claim(slot, self.slots())

    def unclaim(self, slot):
        """Give back a slot claim_idle took, to the requests waiting; a slot not claimed: nothing."""
        with self._changed:
            if self._ids.unclaim(slot):
                self._dispatch()

    def idle_slots(self) -> list:
        """The slot ids no turn holds and nobody claimed (numbered queues whose slot count is known; else [])."""
        with self._changed:
            return self._ids.idle(self.slots()) if self.numbered() else []

    def _room(self):
        """What a turn granted now would take: None while no slot is free; else the free slot ids to pick from,
        () for a grant without an id (a queue not numbered, or the slot count unknown: no limit)."""
        numbered = self.numbered()
        if not numbered and self.in_flight == 0 and not self._ids.claimed:
            return ()  # every llama-server has a slot: no need to know how many
        slots = self.slots()
        if slots is None:
            return ()
        if not numbered:
            return () if self.in_flight + len(self._ids.claimed) < slots else None
        return self._ids.free(slots) or None

    def _grant(self, turn, room):
        turn.granted = True
        turn.waited_s = self.clock() - turn.entered
        self.in_flight += 1
        if room:
            turn.slot = self._ids.pick(room, turn.prefer)
            self._ids.take(turn.slot)
        else:
            self._ids.anonymous += 1

    def _dispatch(self):
        """Hand free slots round robin to the clients waiting (under the lock)."""
        granted = False
        while self._order:
            room = self._room()
            if room is None:
                break
            client = self._order[0]
            waiting = self._waiting[client]
            self._grant(waiting.popleft(), room)
            granted = True
            self._credit[client] -= 1
            if not waiting:
                self._forget(client)
            elif self._credit[client] <= 0:
                self._order.rotate(-1)
                self._credit[client] = waiting[0].weight
        if granted:
            self._changed.notify_all()

    def _forget(self, client):
        del self._waiting[client]
        self._order.remove(client)
        del self._credit[client]

    def _wait(self, turn, timeout, gone):
        with self._changed:
            limit = self.clock() + timeout if timeout is not None else turn.entered + self.timeout
            while not turn.granted:
                if turn.done:
                    return False
                now = self.clock()
                if now >= turn.entered + self.timeout:
                    self._leave(turn)
                    raise QueueTimeout(self.name, self.timeout)
                if now >= limit:
                    return False
                if gone is not None and self._asks_gone(turn, gone):
                    return False
                self._changed.wait(min(GONE_CHECK_S, limit - now))
            return True

    def _asks_gone(self, turn, gone) -> bool:
        """gone(), the turn out of its queue if the client left, or if gone() raised (the gateway is stopping):
        a turn nobody waits on must never be granted a slot (under the lock)."""
        try:
            left = gone()
        except BaseException:
            self._leave(turn)
            raise
        if left:
            self._leave(turn)
        return left

    def _leave(self, turn):
        """Take a waiting turn out of its queue (under the lock)."""
        turn.done = True
        waiting = self._waiting.get(turn.client)
        if waiting is not None and turn in waiting:
            waiting.remove(turn)
            if not waiting:
                self._forget(turn.client)

    def _release(self, turn):
        with self._changed:
            if turn.done:
                return
            if turn.granted:
                turn.done = True
                self.in_flight -= 1
                if turn.slot is not None:
                    self._ids.give_back(turn.slot)  # turn.slot stays: what ran where, for whoever asks after
                else:
                    self._ids.anonymous -= 1
                self._dispatch()
            else:
                self._leave(turn)


class Scheduler:
    """One FairQueue per model route; slot counts from the model's spec (slots), else the llama-servers' /props.
    A route a reload removed takes its queue with it once nothing holds the route (no request in flight)."""

    def __init__(self, slots_of, *, timeout_s, max_per_client, weights=None, clock=time.monotonic, numbered=None):
        self.slots_of = slots_of  # slots_of(replica) -> int or None (unknown)
        # numbered(route) -> True where the route's queue hands out slot ids (one llama-server the gateway runs).
        self.numbered = numbered
        self.timeout = timeout_s
        self.max_per_client = max_per_client
        self.weights = weights or {}
        self.clock = clock
        self.listeners = []  # called with (model, seconds waited) for each request that got a slot (metrics)
        # By the route object, weakly: each reload's new routes would otherwise add queues forever, and an id
        # would be reused by a later route, which would inherit a dead route's queue.
        self._queues = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def queue_for(self, route) -> FairQueue:
        """The route's queue, made on first use."""
        queue = self._queues.get(route)
        if queue is None:
            with self._lock:
                queue = self._queues.get(route)
                if queue is None:
                    route_ref = weakref.ref(route)
                    queue = self._queues[route] = FairQueue(route.name, self._slots_now(route_ref),
                                                            timeout_s=self.timeout,
                                                            max_per_client=self.max_per_client, clock=self.clock,
                                                            numbered=self._numbered_now(route_ref))
        return queue

    def _slots_now(self, route_ref):
        # The queue asks through a weak reference: a strong one would keep its route, so its queue, alive.
        def slots():
            route = route_ref()
            return None if route is None else self._route_slots(route, ask=False)
        return slots

    def _numbered_now(self, route_ref):
        if self.numbered is None:
            return None

        def numbered():
            route = route_ref()
            return route is not None and bool(self.numbered(route))
        return numbered

    def enter(self, route, client, prefer=()) -> Turn:
        """A request's Turn for route's slots; prefer: slot ids in order of preference (numbered queues)."""
        queue = self.queue_for(route)
        # The slot count matters (with concurrency, or for an id): learn it here, not under the queue's lock (it
        # may ask).
        if queue.in_flight or queue.numbered():
            self._route_slots(route, ask=True)
        return queue.enter(client, self.weights.get(client, 1), prefer)

    def _route_slots(self, route, ask):
        """The slots of route's replicas in rotation (all of them while every one is out); None if unknown."""
        replicas = [replica for replica in route.replicas if not replica.ejected] or route.replicas
        counts = [self.slots_of(replica, ask) for replica in replicas]
        return None if None in counts else sum(counts)

    def observe_wait(self, model, waited_s):
        """Tell the listeners how long a request waited for its slot."""
        for listener in self.listeners:
            listener(model, waited_s)

    @property
    def queues(self) -> list:
        """Every queue made so far (for metrics)."""
        return list(self._queues.values())


class SlotCounts:
    """Each replica's slot count: its model's spec (slots), else configured by name, else llama.cpp's /props
    total_slots, asked once (again after SLOTS_RETRY_S if the ask failed)."""

    def __init__(self, ask_props, configured=None, clock=time.monotonic):
        self.ask_props = ask_props  # ask_props(url) -> dict
        self.configured = configured or {}  # model name -> slots (MODEL_SETTINGS, for routes without a spec)
        self.clock = clock
        self._known = {}  # (url, the spec's identity) -> its slots
        self._failed_at = {}  # (url, the spec's identity) -> when the ask failed
        self._asking = threading.Lock()  # one ask at a time: the others wait for its answer

    def __call__(self, replica, ask=True):
        """The replica's slots, or None while unknown; without ask, only what is known already."""
        spec = replica.route.spec  # a reload may change it: read at each call
        configured = spec.slots if spec is not None and spec.slots else self.configured.get(replica.route.name)
        if configured:
            replica.slots = configured
            return configured
        # What was learnt holds for one llama.cpp command line: a reload that changes it (--parallel) keeps the URL.
        key = (replica.url, spec.identity() if spec is not None else None)
        known = self._known.get(key)
        if known is not None:
            return known
        if not ask or self.clock() - self._failed_at.get(key, float("-inf")) < SLOTS_RETRY_S:
            return None
        with self._asking:
            known = self._known.get(key)
            if known is not None:  # learnt while this one waited
                return known
            if self.clock() - self._failed_at.get(key, float("-inf")) < SLOTS_RETRY_S:
                return None
            try:
                slots = self.ask_props(replica.url).get("total_slots")
            except Exception:  # noqa: BLE001 - unknown for now: no limit rather than no service
                slots = None
        if isinstance(slots, int) and slots > 0:
            self._known[key] = replica.slots = slots  # the replica's, for cache-aware placement
            return slots
        self._failed_at[key] = self.clock()
        return None


def init_scheduler(app, settings, numbered=None):
    """Give app its scheduler (app.extensions["scheduler"]): fair shares of the slots, or None for fifo;
    numbered(route) -> True where a route's queue hands out slot ids."""
    if settings["SCHEDULER"] != "fair":
        app.extensions["scheduler"] = None
        return
    upstream = app.extensions["upstream"]

    def ask_props(url):
        return upstream.read_json(upstream.request("GET", "/props", group="models", base_url=url), "/props")[1]

    configured = {name: own["slots"] for name, own in (settings["MODEL_SETTINGS"] or {}).items() if "slots" in own}
    weights = {client: own["weight"] for client, own in (settings["RATE_LIMITS"] or {}).items() if "weight" in own}
    app.extensions["scheduler"] = Scheduler(SlotCounts(ask_props, configured), timeout_s=settings["QUEUE_TIMEOUT_S"],
                                            max_per_client=settings["QUEUE_MAX_PER_CLIENT"], weights=weights,
                                            numbered=numbered)
