"""Cache-aware placement: a request whose prompt begins like a recent one's (the same system prompt, the same
earlier turns) goes back to the replica that served that one, where llama.cpp still holds those tokens in its
prompt cache (a cached prompt costs a fraction of computing it afresh on a CPU).

The reference is SGLang's cache-aware router, kept cheap: instead of a radix tree over the text, a chain of hashes
of the prompt's leading parts (its tools, each message; or each whole 1 KiB of a plain prompt:
service/warm/prefix.py), in a bounded table per model that maps a prefix's hash to the replica that last served it. The longest known prefix wins.
"""
import collections
import threading

# The keys are the warm package's stable chained hashes: the same prefix names the same saved slot state on disk.
from ..warm.prefix import PROMPT_PART, prefix_keys

__all__ = ["AffinityTable", "PROMPT_PART", "prefix_keys"]  # relay.py and the tests import the keys from here

# Prefixes remembered per model: enough for hundreds of conversations of a few dozen turns.
TABLE_SIZE = 8192


class AffinityTable:
    """Which replica last served each prompt prefix of one model (bounded, least recently used forgotten)."""

    def __init__(self, size=TABLE_SIZE):
        self.size = size
        self._table = collections.OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, keys):
        """The replica that served the longest of these prefixes, or None."""
        with self._lock:
            for key in reversed(keys):
                replica = self._table.get(key)
                if replica is not None:
                    return replica
        return None

    def remember(self, keys, replica):
        """Note that replica served these prefixes."""
        with self._lock:
            for key in keys:
                self._table[key] = replica
                self._table.move_to_end(key)
            while len(self._table) > self.size:
                self._table.popitem(last=False)
