"""One request's part in warm conversations (service/warm): the slot it prefers (the one holding its conversation),
the saved state restored into the slot it was given, that slot named to llama.cpp (id_slot), and what the slot
holds once it is done. Only for a generation on a model the gateway runs alone in one llama.cpp (its queue hands
out slot ids); any other request costs nothing here."""
import re

from flask import current_app

from ..warm.prefix import preamble_length
from .affinity import prefix_keys

# llama.cpp's endpoints that take no id_slot (its Anthropic converter drops the field): it picks the slot itself.
CHOOSES_SLOT = ("/v1/messages",)
# The end of a JSON object: its closing brace and whatever blanks follow it.
_OBJECT_END = re.compile(rb"}\s*$")


class WarmRequest:
    """What warm conversations know and do for one request."""

    def __init__(self, warm, name, keys, record, chooses_slot=False, preamble=0):
        self.warm = warm  # the app's WarmGateway
        self.name = name  # its model's id, as the pool and warm conversations know it
        self.keys = keys  # its prompt's prefix keys (service/warm/prefix.py); None: it only overwrites a slot
        self.preamble = preamble  # how many of keys are its tools and system prompt (its state's alias)
        self.record = record
        self.model = None  # its WarmModel, once its model is loaded
        self.plan = None
        # llama.cpp chooses the slot itself (Anthropic's /v1/messages drops id_slot): a restore goes into the
        # slot the queue gave, where llama.cpp's own prefix match finds it; where the request ran is asked after.
        self.chooses_slot = chooses_slot
        self.tasks = 1  # llama.cpp's tasks for it: an embedding of several texts runs one per text

    def prefer(self) -> tuple:
        """The slots to give this request, best first (asked once its model is loaded, before it queues)."""
        self.model = self.warm.model(self.name)
        if self.model is None or self.keys is None:
            return ()
        self.plan = self.model.plan(self.keys)
        return tuple(self.plan.prefer)

    def before_send(self, slot, raw: bytes) -> bytes:
        """Restore the saved state its plan found into slot (a failed restore only costs the computing of the
        prompt), and return raw naming slot to llama.cpp."""
        if self.model is None or slot is None or self.keys is None:
            return raw
        if self.plan is not None and self.plan.restore is not None:
            restored = self.model.restore(slot, self.plan)
            if restored:
                self.record.kv_restored = restored
        return with_slot(raw, slot)

    def abandon(self):
        """The request will not run (it was refused a place in the queue): let another restore what it planned."""
        if self.model is not None and self.plan is not None:
            self.model.abandon(self.plan)

    def release(self, turn, record):
        """The request is over: tell warm conversations what its slot holds now (nothing sure if it failed), and
        let another request restore what this one planned to, if it never did."""
        if self.model is None:
            return
        if self.plan is not None:
            self.model.abandon(self.plan)  # a restore done or never to be done: no longer under way
        if turn.granted and not turn.done and self.keys is None:
            # An embedding or a rerank: it filled the slots llama.cpp chose with what no conversation reuses.
            for ran in self.warm.slots_that_ran(self.model, self.tasks):
                self.model.finished(ran, (), 0, False)
            return
        if turn.granted and not turn.done and turn.slot is not None:
            ok = record.status is not None and record.status < 400 and record.error is None
            slot = turn.slot
            if self.chooses_slot:
                ran = self.warm.slot_that_ran(self.model, record.prompt_tokens if ok else None,
                                              record.completion_tokens)
                if ran is None or not ok:  # not known where it ran, or it failed there: both slots are unsure
                    for unsure in {slot, ran} - {None}:
                        self.model.finished(unsure, (), 0, False)
                    return
                slot = ran
            self.model.finished(slot, self.keys, record.total_tokens, ok, self.preamble)


def with_slot(raw: bytes, slot: int) -> bytes:
    """The JSON object raw with "id_slot": slot as its last member (llama.cpp takes the last of two: a client's
    own id_slot never moves a request off the slot the gateway gave it)."""
    match = _OBJECT_END.search(raw)
    if match is None:
        return raw  # not an object: the schema refused it before; nothing to name
    head = raw[:match.start()].rstrip()
    comma = b"" if head.endswith(b"{") else b","
    return head + comma + b'"id_slot":' + str(int(slot)).encode() + b"}"


def warm_request(route, endpoint, body, record):
    """The request's WarmRequest, or None where warm conversations have no part in it."""
    warm = current_app.extensions.get("warm")
    if warm is None or not endpoint.takes_slot or not warm.numbered(route):
        return None
    if not endpoint.reuses_prompt:  # an embedding, a rerank: what it leaves in its slot is no conversation's
        overwriting = WarmRequest(warm, route.spec.id, None, record)
        overwriting.tasks = texts_in(body)
        return overwriting
    return WarmRequest(warm, route.spec.id, prefix_keys(body), record, chooses_slot=endpoint.path in CHOOSES_SLOT,
                       preamble=preamble_length(body))


def texts_in(body) -> int:
    """How many texts an embedding's input (or a rerank's documents) holds: llama.cpp runs a task per text."""
    texts = body.get("input", body.get("documents"))
    if isinstance(texts, list) and texts and not isinstance(texts[0], int):  # a list of token ids is one text
        return len(texts)
    return 1
