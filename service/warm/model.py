"""One warm model: the live slots of its llama.cpp, its saved states, and the two things done to a slot through
llama.cpp's /slots endpoint: save (by the saver, while the slot is claimed idle) and restore (before a request)."""
import collections
import logging
import os
import threading
import time

from .index import file_digest, state_name, tmp_name
from .slots import SlotTable

log = logging.getLogger(__name__)

SAVE_TIMEOUT_S = 120.0  # a state of a long prompt on a slow disk: hundreds of MB
RESTORE_TIMEOUT_S = 60.0
# A restore planned but never done (its request gave up in the queue without abandon()) stops blocking others.
RESTORING_STALE_S = 300.0

# What the slot table learns from a save's result (_save's).
AFTER_SAVE = {
    "ok": lambda slots, slot, key: slots.saved(slot, key),
    "failed": lambda slots, slot, key: slots.gave_up(slot, key),
    "emptier": lambda slots, slot, key: slots.forget(slot),
}

# prefer: slot ids for the scheduler, best first; restore: (key, entry) to load into the granted slot, or None.
Plan = collections.namedtuple("Plan", "prefer restore")


class WarmModel:
    """One model's llama.cpp (base_url, slots 0..parallel-1) as far as warm conversations go. Thread-safe."""

    def __init__(self, owner, name, base_url, identity, parallel, queue):
        self.owner, self.name, self.base_url, self.identity, self.queue = owner, name, base_url, identity, queue
        self.slots = SlotTable(parallel)
        self.index = owner.budget.index(identity, name)
        # The key of a state file -> (when its restore was planned, that Plan): per file, since conversations
        # that share a preamble find one file under its alias.
        self._restoring = {}
        self._lock = threading.Lock()
        self.save_lock = threading.Lock()  # one save at a time per model
        self._reported = set()  # failure kinds logged since the last success

    def plan(self, keys) -> Plan:
        """Where a request with these prefix keys should run: the live slot holding its longest prefix, or (when
        a saved state holds a longer one, not being restored already) a restore into a free slot. The state found
        may be another conversation's that begins with this one's preamble (found under its alias)."""
        live = self.slots.holder(keys)
        prefer = (live[0],) if live else ()
        found = self.index.lookup(keys[live[1] if live else 0:])  # only a prefix longer than any live slot's
        if found is None or found[1]["tokens"] < self.owner.min_tokens:
            return Plan(prefer, None)
        with self._lock:
            now, key = time.monotonic(), found[0]
            if now - self._restoring.get(key, (-RESTORING_STALE_S,))[0] < RESTORING_STALE_S:
                return Plan(prefer, None)  # the same conversation is being restored for another request
            # The scheduler picks the free slot used least recently: the cheapest content to overwrite.
            plan = Plan((), found)
            self._restoring[key] = (now, plan)
        return plan

    def abandon(self, plan: Plan):
        """The request of plan will not restore (it gave up waiting, or it is over): its key may be restored for
        another request. Calling it twice, or after restore(), does nothing."""
        if plan is not None and plan.restore is not None:
            with self._lock:
                key = plan.restore[0]
                if self._restoring.get(key, (0, None))[1] is plan:  # not a later request's restore of it
                    del self._restoring[key]

    def restore(self, slot, plan: Plan):
        """Load plan's saved state into slot; the tokens restored, or None (the entry dropped). Never raises."""
        if plan.restore is None:
            return None
        if not isinstance(slot, int):  # a queue that hands out no slot ids: nowhere to restore into
            self.abandon(plan)
            return None
        key, entry = plan.restore
        try:
            result, tokens = self._restore(slot, key, entry)
        finally:
            self.abandon(plan)
        self.owner.count(self.name, "restores", result, tokens)
        if result == "hit":
            return tokens
        self.index.drop(key)
        self.slots.forget(slot)
        return None

    def _restore(self, slot, key, entry):
        path = self.index.path(key)
        if not os.path.isfile(path):
            return "missing", 0
        try:
            # Checked here, not by llama.cpp: a file cut short in its data makes llama.cpp abort, not answer 400.
            intact = os.path.getsize(path) == entry["bytes"] and file_digest(path) == entry["blake2b"]
        except OSError:
            return "missing", 0
        if not intact:
            self._report("restore", "damaged file")
            return "mismatch", 0
        try:
            status, body = self.owner.post(self.base_url, f"/slots/{int(slot)}?action=restore",
                                           {"filename": state_name(key)}, RESTORE_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - whatever the transport raises, the request goes on as today
            self._report("restore", type(error).__name__)
            return "failed", 0
        if status != 200 or not isinstance(body, dict):
            self._report("restore", f"HTTP {status}")
            return "failed", 0
        if body.get("n_restored") != entry["tokens"] or body.get("n_read") != entry["bytes"]:
            self._report("restore", "size mismatch")
            return "mismatch", 0
        self.slots.restored(slot, key, entry["tokens"])
        self.index.touch(key)
        log.info("warm: %s slot %s restored %d tokens (%s)", self.name, slot, entry["tokens"], key.hex()[:8])
        return "hit", entry["tokens"]

    def finished(self, slot, keys, tokens, ok: bool, preamble: int = 0):
        """A request ended in slot (call it before its turn is released): ok, the slot holds keys' prompt in tokens
        tokens, the first preamble of them its tools and system prompt; not ok, its content is unknown."""
        if ok:
            self.slots.ran(slot, keys, tokens, preamble)
        else:
            self.slots.forget(slot)

    def save(self, slot) -> bool:
        """Save slot's state (the slot must be idle: the saver claims it); True when saved. Never raises."""
        with self.save_lock:
            content = self.slots.content(slot)
            if content is None:
                return False
            key, tokens, held, preamble = content
            if not self.owner.budget.room_for(tokens * self._bytes_per_token()):
                self.owner.count(self.name, "saves", "skipped")
                self.slots.gave_up(slot, key)
                return False
            temporary = os.path.join(self.index.directory, tmp_name(key))
            try:
                result = self._save(slot, key, temporary, tokens, preamble)
            finally:
                _remove_quietly(temporary)  # gone after a rename; a save cut short leaves nothing behind
            saved = result == "ok"
            self.owner.count(self.name, "saves", "ok" if saved else "failed")
            # A slot emptier than the table says holds something else: unknown. Any other failure: given up.
            AFTER_SAVE[result](self.slots, slot, key)
            if saved:
                # Earlier turns of this conversation: the state just saved holds them too (llama.cpp reuses the
                # common part of a restored state), so they would only take disk. Dropping one drops the aliases
                # to it; the preamble's alias names the state just saved already.
                for older in held - {key}:
                    if older in self.index.entries():
                        self.index.drop(older)
                self.owner.budget.saved()
                self.owner.budget.enforce()
            return saved

    def _save(self, slot, key, temporary, tokens, preamble=None) -> str:
        """"ok", "failed", or "emptier" (the slot holds less than the gateway last ran there)."""
        try:
            self.index.make_directory()  # deleted by hand meanwhile: llama.cpp writes only into an existing one
            status, body = self.owner.post(self.base_url, f"/slots/{int(slot)}?action=save",
                                           {"filename": tmp_name(key)}, SAVE_TIMEOUT_S)
            if status != 200 or not isinstance(body, dict):
                self._report("save", f"HTTP {status}")
                return "failed"
            size = os.path.getsize(temporary)
            if size != body.get("n_written") or not isinstance(body.get("n_saved"), int):
                self._report("save", "size mismatch")
                return "failed"
            if body["n_saved"] < max(1, tokens // 2):
                # Not what the gateway last ran there (empty, or another prompt): a llama.cpp restarted meanwhile
                # (its slots start empty), or it ran the request in another slot than the gateway thought.
                # Saved under this conversation's key, it would replace the state that holds it.
                self._report("save", "slot emptier than expected")
                return "emptier"
            digest = file_digest(temporary)
            os.replace(temporary, self.index.path(key))
        except OSError as error:
            self._report("save", error.strerror or type(error).__name__)
            return "failed"
        except Exception as error:  # noqa: BLE001 - the transport's errors: saving is best effort, never fatal
            self._report("save", type(error).__name__)
            return "failed"
        self.index.add(key, body["n_saved"], size, digest, alias=preamble)
        self._reported.clear()
        log.info("warm: %s slot %s saved %d tokens, %d bytes (%s)", self.name, slot, body["n_saved"], size,
                 key.hex()[:8])
        return "ok"

    def _bytes_per_token(self) -> float:
        entries = self.index.entries().values()
        tokens = sum(entry["tokens"] for entry in entries)
        return sum(entry["bytes"] for entry in entries) / tokens if tokens else 0.0

    def _report(self, action, kind):
        # Once per kind until a save succeeds: a broken disk must not fill the log every second.
        if (action, kind) not in self._reported:
            self._reported.add((action, kind))
            log.warning("warm: %s: %s of a slot state failed: %s", self.name, action, kind)


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass
