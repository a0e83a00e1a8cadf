"""The saver: one thread for the gateway that, every second, saves the slots worth saving (unsaved, long enough,
idle for a second or unsaved for KV_SAVE_INTERVAL_S), each while it holds the slot claimed in the model's queue so
that no request runs in it meanwhile. One save at a time per model."""
import logging
import threading
import time

log = logging.getLogger(__name__)

TICK_S = 1.0
IDLE_S = 1.0  # a slot this long without a request is saved (an agent's next turn rarely comes sooner)
# How long a save before an unload waits for the thread's save of the same slot to end (a state of hundreds of MB).
SAVE_ALL_WAIT_S = 30.0


class Saver:
    """Saves the warm models' slots in the background (start/stop), or all at once before an unload (save_all)."""

    def __init__(self, conversations, tick_s=TICK_S, idle_s=IDLE_S, clock=time.monotonic):
        self.conversations = conversations
        self.tick_s, self.idle_s, self._clock = tick_s, idle_s, clock
        self._stop = threading.Event()
        self._thread = None
        self._saving = set()  # (model, slot) of the saves under way, by the thread or save_all
        self._changed = threading.Condition()

    def start(self):
        """Start the thread (once)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="warm-saver", daemon=True)
            self._thread.start()

    def stop(self, timeout=10.0):
        """Stop the thread; a save under way finishes first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self):
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the thread must outlive any one bad tick; keys only in the trace
                log.exception("warm: the saver's tick failed")

    def tick(self) -> int:
        """One pass over every warm model; returns how many slots were saved."""
        conversations, now = self.conversations, self._clock()
        saved = 0
        for model in conversations.models():
            for slot in model.slots.to_save(now, self.idle_s, conversations.interval_s, conversations.min_tokens):
                saved += self._save_claimed(model, slot)
        return saved

    def save_all(self, model, wait_s=SAVE_ALL_WAIT_S) -> int:
        """Save every unsaved slot of model that holds at least min_tokens (before it is unloaded, after its
        drain); a slot the thread is saving now is waited for (up to wait_s), then saved if still unsaved.
        Returns how many were saved."""
        slots = model.slots.to_save(self._clock(), 0.0, 0.0, self.conversations.min_tokens)
        return sum(self._save_claimed(model, slot, wait_s) for slot in slots)

    def _save_claimed(self, model, slot, wait_s=0.0) -> bool:
        if not self._begin(model, slot, wait_s):
            return False
        try:
            if not model.slots.unsaved(slot):  # saved (or given up on) by the save just waited for
                return False
            # Claimed: the queue grants no request this slot while llama.cpp writes it out (a save needs it idle).
            if model.queue is None or not model.queue.claim_idle(slot):
                return False
            try:
                return model.save(slot)
            finally:
                model.queue.unclaim(slot)
        finally:
            with self._changed:
                self._saving.discard((model, slot))
                self._changed.notify_all()

    def _begin(self, model, slot, wait_s) -> bool:
        """Mark slot's save as under way; when another is, wait up to wait_s for it to end (0: do not wait)."""
        with self._changed:
            if not self._changed.wait_for(lambda: (model, slot) not in self._saving, wait_s):
                return False
            self._saving.add((model, slot))
            return True
