"""Cache-aware placement: a request whose prompt begins like a recent one's (the same system prompt, the same
earlier turns) goes back to the replica that served that one, where llama.cpp still holds those tokens in its
prompt cache (a cached prompt costs a fraction of computing it afresh on a CPU).

The reference is SGLang's cache-aware router, kept cheap: instead of a radix tree over the text, a chain of hashes
of the prompt's leading parts (each message; or each 1 KiB of a plain prompt), in a bounded table per model that
maps a prefix's hash to the replica that last served it. The longest known prefix wins.
"""
import collections
import json
import threading

# Prefixes remembered per model: enough for hundreds of conversations of a few dozen turns.
TABLE_SIZE = 8192
# A plain prompt (completions, a string input) is cut into parts of this many characters.
PROMPT_PART = 1024


def prefix_keys(body: dict) -> list:
    """Hashes of the request's prompt prefixes, shortest first: the system prompt, then each message after it
    (or each PROMPT_PART characters of a plain prompt)."""
    keys, key = [], 0
    for part in _parts(body):
        key = hash((key, part))
        keys.append(key)
    return keys


def _parts(body):
    for name in ("system", "instructions"):  # Anthropic's system prompt, the Responses API's instructions
        if body.get(name):
            yield _text(body[name])
    for name in ("messages", "input", "prompt"):
        value = body.get(name)
        if isinstance(value, str):
            yield from (value[start:start + PROMPT_PART] for start in range(0, len(value), PROMPT_PART))
        elif isinstance(value, list):
            yield from (_text(item) for item in value)


def _text(item) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("content"), str):
        return f"{item.get('role')}\0{item['content']}"
    return json.dumps(item, sort_keys=True)  # parts with images, tool calls: rare, and the exact form matters


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
