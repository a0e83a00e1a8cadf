"""What each slot of one llama.cpp holds, as far as the gateway knows: the prefix keys of the last prompt it ran (or
the one key restored into it), how many tokens, and whether that content is saved yet. Keys and counts only."""
import threading
import time


class _Slot:
    __slots__ = ("keys", "top", "preamble", "tokens", "dirty", "dirty_since", "last_use")

    def __init__(self):
        self.keys = frozenset()  # every prefix key whose tokens this slot holds
        self.top = None  # the longest of them: the name its state is saved under
        self.preamble = None  # the key of its tools and system prompt, shorter than top: its state's alias
        self.tokens = 0
        self.dirty = False  # holds content not saved yet
        self.dirty_since = 0.0
        self.last_use = 0.0


class SlotTable:
    """The live slots of one llama.cpp (slot ids 0..parallel-1). Thread-safe."""

    def __init__(self, parallel: int, clock=time.monotonic):
        self.parallel = parallel
        self._clock = clock
        self._slots = [_Slot() for _ in range(parallel)]
        self._lock = threading.Lock()

    def _slot(self, slot):
        return self._slots[slot] if isinstance(slot, int) and 0 <= slot < self.parallel else None

    def ran(self, slot, keys, tokens: int, preamble: int = 0):
        """A request ran in slot: it now holds keys' prompt (and its answer) in tokens tokens, not saved yet; the
        first preamble of keys are its tools and system prompt (prefix.preamble_length)."""
        with self._lock:
            state, now = self._slot(slot), self._clock()
            if state is None:
                return
            if not state.dirty:
                state.dirty_since = now
            state.keys, state.top = frozenset(keys), (keys[-1] if keys else None)
            state.tokens, state.dirty, state.last_use = int(tokens), bool(keys), now
            state.preamble = keys[preamble - 1] if 0 < preamble < len(keys) else None

    def restored(self, slot, key: bytes, tokens: int):
        """key's saved state was loaded into slot: it holds that, and it is on disk already."""
        with self._lock:
            state = self._slot(slot)
            if state is not None:
                state.keys, state.top, state.tokens, state.preamble = frozenset((key,)), key, int(tokens), None
                state.dirty, state.last_use = False, self._clock()

    def saved(self, slot, key: bytes):
        """slot's content was saved under key (if it still holds that, it is clean now)."""
        with self._lock:
            state = self._slot(slot)
            if state is not None and state.top == key:
                state.dirty = False

    def gave_up(self, slot, key: bytes):
        """slot's save under key failed or was skipped: not tried again until its content changes (a full disk or
        a refusing llama.cpp would otherwise cost a whole state's write every tick)."""
        self.saved(slot, key)

    def unsaved(self, slot) -> bool:
        """Whether slot holds content the gateway can name that is not saved (nor given up on) yet."""
        with self._lock:
            state = self._slot(slot)
            return state is not None and state.dirty and state.top is not None

    def forget(self, slot):
        """slot's content is unknown (a request failed in it, a restore failed)."""
        with self._lock:
            if self._slot(slot) is not None:
                self._slots[slot] = _Slot()

    def clear(self):
        """Nothing is held (llama.cpp restarted or was unloaded)."""
        with self._lock:
            self._slots = [_Slot() for _ in range(self.parallel)]

    def holder(self, keys):
        """(slot, depth) of the slot holding the longest of these prefixes (depth: how many of keys), else None;
        between equals, the one used last."""
        best = None
        with self._lock:
            for slot, state in enumerate(self._slots):
                depth = next((index + 1 for index in range(len(keys) - 1, -1, -1) if keys[index] in state.keys), 0)
                if depth and (best is None or (depth, state.last_use) > best[0]):
                    best = ((depth, state.last_use), slot)
        return None if best is None else (best[1], best[0][0])

    def content(self, slot):
        """(key, tokens, keys, preamble) of what slot holds (key: the longest prefix, keys: all of them, preamble:
        the key of its tools and system prompt, or None), or None when it holds nothing the gateway can name."""
        with self._lock:
            state = self._slot(slot)
            return None if state is None or state.top is None else (state.top, state.tokens, state.keys,
                                                                    state.preamble)

    def to_save(self, now: float, idle_s: float, interval_s: float, min_tokens: int) -> list:
        """The slots worth saving now: unsaved, at least min_tokens, and idle for idle_s since their last request or
        unsaved for interval_s (0: never for that reason); the longest unsaved first."""
        with self._lock:
            due = [(state.dirty_since, slot) for slot, state in enumerate(self._slots)
                   if state.dirty and state.top is not None and state.tokens >= min_tokens
                   and (now - state.last_use >= idle_s or (interval_s > 0 and now - state.dirty_since >= interval_s))]
        return [slot for _, slot in sorted(due)]
