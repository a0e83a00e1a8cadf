"""What a request waits for before it is sent to llama.cpp: its local model's load (service/llama/pool.py), then
its turn at one of the model's slots (scheduler.py). What it took is given back once, when its answer has been
sent (the policy's close, service/policy/hooks.py). Once the shutdown grace is over (operations/lifecycle.py), every
wait ends with ShuttingDown and no request is let through any more: a freed slot goes to nobody."""
from flask import current_app, g, request

from ..errors import ClientClosedRequest
from ..llama.pooled_model import ModelRemoved


class Admission:
    """One request's claim on its model and its place in the model's queue."""

    def __init__(self, hold, scheduler, route, client, record, client_gone, lifecycle=None, warm=None):
        self.hold = hold  # the pool's Hold, or None where the gateway does not run the model
        self.turn = None  # the scheduler's Turn, taken once the model is loaded
        self.warm = warm  # its WarmRequest (warm_request.py): the slot it prefers, a restore, or None
        self._scheduler = scheduler  # None: no queue (SCHEDULER=fifo, or a call that takes no slot)
        self._route = route
        self._client = client
        self._record = record
        self._client_gone = client_gone  # True once the client has left (waitress tells), or None
        self._lifecycle = lifecycle  # the gateway's Lifecycle, which says when the shutdown grace is over

    def gone(self) -> bool:
        """True once the client has left (where waitress can tell). Raise ShuttingDown once the shutdown grace is
        over: every wait that asks (the model's load or restart, the queue; each asks every quarter second) ends
        there."""
        if self._lifecycle is not None:
            self._lifecycle.refuse_if_cut()
        return self._client_gone is not None and self._client_gone()

    def wait(self, timeout=None) -> bool:
        """Wait up to timeout (None: as long as the load and the queue allow) for the model, then for a slot;
        True once both are had. Raise what the pool or the queue raise (503, 429), ClientClosedRequest if
        the client left while queued, ShuttingDown once the shutdown grace is over."""
        if not self._wait(timeout):
            return False
        if self._lifecycle is not None:
            # A slot freed by a call the shutdown cut goes to the next in the queue: it is not sent upstream.
            self._lifecycle.refuse_if_cut()
        return True

    def _wait(self, timeout) -> bool:
        if self.hold is not None and not self.hold.wait(timeout, self.gone):
            return False
        if self.turn is None:
            if self._scheduler is None:
                return True
            # Asked only now: which slots hold what is known once the model is loaded.
            prefer = self.warm.prefer() if self.warm is not None else ()
            try:
                self.turn = self._scheduler.enter(self._route, self._client, prefer=prefer)
            except BaseException:
                if self.warm is not None:
                    self.warm.abandon()  # refused (queue full): its planned restore is free for another
                raise
        elif self._record.queue_ms is not None:
            return True  # had already
        if not self.turn.granted and not self.turn.wait(timeout, self.gone):
            if self.turn.done:
                raise ClientClosedRequest()  # it left the queue: nobody is there to answer
            return False
        self._record.queue_ms = round(self.turn.waited_s * 1000, 2)
        self._scheduler.observe_wait(self._route.name, self.turn.waited_s)
        return True

    def release(self):
        """Give back the slot and the model (each once; a second call does nothing)."""
        try:
            if self.turn is not None:
                try:
                    if self.warm is not None:
                        self.warm.release(self.turn, self._record)  # before its slot can go to another
                finally:
                    self.turn.release()
        finally:
            if self.hold is not None:
                self.hold.release()


def admit(route, takes_slot=True, warm=None) -> Admission:
    """This request's Admission for route, kept on g for the policy's close to release: the model claimed (its
    load started if need be), the queue entered once the model is loaded (Admission.wait); warm: its
    WarmRequest, if its model keeps warm conversations."""
    pool = current_app.extensions.get("model_pool")
    if pool is None and route.removed:  # found just before a reload removed it (the pool's claim says so too)
        raise ModelRemoved(route.name or route.spec.id)
    hold = pool.claim(route) if pool is not None else None
    scheduler = current_app.extensions.get("scheduler") if takes_slot else None
    record = g.record
    g.admission = admission = Admission(hold, scheduler, route, record.client_id or "anonymous", record,
                                        request.environ.get("waitress.client_disconnected"),
                                        current_app.extensions.get("lifecycle"), warm if scheduler is not None else None)
    return admission
