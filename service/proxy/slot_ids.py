"""Which of one llama.cpp's slot ids (0..slots-1) a numbered queue (scheduler.py) has handed out: held by a
granted request, claimed by the warm-conversation saver (its state being saved: no request may run there), or free;
and when each was last given back, so that a request with no preference lands in the slot used least recently
(the one whose cached prompt is the least likely to be asked for again).

Not thread-safe on its own: its FairQueue calls it under the queue's lock. `slots` is passed to each call because
it may change between calls (a replica ejected, a reload): an id at or past it is never handed out or claimed.
"""


class SlotIds:
    """The slot ids of one numbered queue: held, claimed, free, and when each was last used."""

    def __init__(self, clock):
        self.clock = clock
        self.held = set()  # ids a granted request runs in
        self.claimed = set()  # ids the saver holds (a save or restore needs the slot idle)
        # Requests granted without an id (the slot count was unknown, or the queue was not numbered then): each
        # runs in some slot, which one llama.cpp chose. They count against capacity and, while any runs, no slot
        # is known to be idle.
        self.anonymous = 0
        self._last_used = {}  # id -> when its last request gave it back

    def free(self, slots) -> list:
        """The ids a request granted now may take (ascending): [] when every slot is taken, counting those held,
        claimed and anonymous ones, even where held ids past a shrunk count leave ids below it unheld."""
        if len(self.held) + self.anonymous + len(self.claimed) >= slots:
            return []
        return [slot for slot in range(slots) if slot not in self.held and slot not in self.claimed]

    def pick(self, free, prefer=()) -> int:
        """Of the free ids, the first preferred one, else the one used least recently (never used first, then
        the lowest id)."""
        for slot in prefer:
            if slot in free:
                return slot
        return min(free, key=lambda slot: (slot in self._last_used, self._last_used.get(slot, 0.0), slot))

    def take(self, slot):
        """A granted request runs in slot now."""
        self.held.add(slot)

    def give_back(self, slot):
        """The request in slot has ended: the slot is free again, last used now."""
        self.held.discard(slot)
        self._last_used[slot] = self.clock()

    def claim(self, slot, slots) -> bool:
        """Take an idle slot for the saver; False if it is held, claimed already, not below slots (None:
        unknown), or if requests run in slots nobody knows (an anonymous one may be in it)."""
        if slots is None or not 0 <= slot < slots or self.anonymous:
            return False
        if slot in self.held or slot in self.claimed:
            return False
        self.claimed.add(slot)
        return True

    def unclaim(self, slot) -> bool:
        """Give back a claimed slot; False (nothing done) if it was not claimed."""
        if slot not in self.claimed:
            return False
        self.claimed.discard(slot)
        return True

    def idle(self, slots) -> list:
        """The ids below slots that no request holds and the saver has not claimed; [] while the count is unknown
        or while a request runs in a slot nobody knows."""
        if slots is None or self.anonymous:
            return []
        return [slot for slot in range(slots) if slot not in self.held and slot not in self.claimed]
