"""What links warm conversations to the rest of the gateway: a model's fair queue as it is now (a reload may give
it a new one), llama.cpp's slot count from its flags, and the calls to llama.cpp through the app's Session."""
import json
import logging

import requests

log = logging.getLogger(__name__)


class LiveQueue:
    """A model's fair queue as it is now: a reload may give the model a new route, and with it a new queue. A claim
    is given back to the queue it was taken from."""

    def __init__(self, gateway, name):
        self.gateway, self.name = gateway, name
        self._claimed = {}  # slot -> the queue that slot was claimed in

    def _queue(self):
        return self.gateway.scheduler.queue_for(self.gateway.router.route(self.name))

    def claim_idle(self, slot) -> bool:
        """Take an idle slot for a save (False if busy, or the model has no route any more)."""
        try:
            queue = self._queue()
            claimed = queue.claim_idle(slot)
        except Exception:  # noqa: BLE001 - a model a reload removed: nothing to save into
            return False
        if claimed:
            self._claimed[slot] = queue
        return claimed

    def unclaim(self, slot):
        """Give a claimed slot back, to the queue it was claimed in."""
        queue = self._claimed.pop(slot, None)
        if queue is not None:
            queue.unclaim(slot)

    def idle_slots(self) -> list:
        """The slots no request holds."""
        try:
            return self._queue().idle_slots()
        except Exception:  # noqa: BLE001
            return []


def parallel_of(flags) -> int:
    """llama.cpp's slot count from its flags (the last --parallel wins, as in llama.cpp); 1 when unset."""
    count = 1
    for flag, value in zip(flags, flags[1:]):
        if flag in ("--parallel", "-np"):
            count = int(value)
    return count


def poster(upstream, connect_timeout_s=5.0):
    """post(base_url, path, body, timeout) -> (status, parsed JSON or None): a save's or a restore's call to
    llama.cpp through the app's Session (its key, its pools), bounded by the caller's timeout."""
    def post(base_url, path, body, timeout=None):
        try:
            response = upstream.session.post(base_url + path, data=json.dumps(body).encode(),
                                             timeout=(connect_timeout_s, timeout), allow_redirects=False)
        except requests.RequestException as error:
            log.debug("a call to llama.cpp's slots failed", extra={"fields": {"error": type(error).__name__}})
            return 502, None
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None
    return post
