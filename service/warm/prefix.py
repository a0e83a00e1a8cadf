"""A prompt's prefixes as a chain of stable hashes: the tools, the system prompt, then each message (or each whole
PROMPT_PART characters of a plain prompt). key_n = blake2b(key_{n-1} + part), so two prompts share keys exactly up
to where they diverge, and the same body gives the same keys in every process (the saved states on disk are named
by them) and in every turn of one conversation (the next turn's keys begin with this turn's)."""
import hashlib
import json

# A plain prompt (completions, a string input) is cut into parts of this many characters; only whole parts make
# keys, so a prompt that grows keeps the keys it had (a trailing partial part would change with every character).
PROMPT_PART = 1024
KEY_BYTES = 16
# Fields a client sends that llama.cpp's prompt never shows, and that move between turns of one conversation:
# Anthropic's cache_control marks the newest block each turn (Claude Code sends it on system, messages and tools).
NOT_RENDERED = frozenset({"cache_control"})
# Leading messages of these roles are the preamble too (chat completions' system prompt, the Responses API's
# developer message): what a new session of the same agent sends again before its own messages.
PREAMBLE_ROLES = frozenset({"system", "developer"})


def prefix_keys(body: dict) -> list:
    """Hashes (16 bytes each) of the request's prompt prefixes, shortest first."""
    keys, key = [], b""
    for part, _ in _parts(body):
        # The previous key has a fixed length, so key + part is never ambiguous.
        key = hashlib.blake2b(key + part.encode("utf-8", "surrogatepass"), digest_size=KEY_BYTES).digest()
        keys.append(key)
    return keys


def preamble_length(body: dict) -> int:
    """How many of prefix_keys(body) are its preamble: the tools, the system prompt or instructions, and the
    leading system/developer messages (0: none). Sessions of one agent share it, whatever their messages."""
    length = 0
    for _, preamble in _parts(body):
        if not preamble:
            break
        length += 1
    return length


def _parts(body):
    """(text, whether it is part of the preamble) of each part of the prompt, in order."""
    if body.get("tools"):  # rendered first, into the system part of the prompt
        yield _text(body["tools"]), True
    for name in ("system", "instructions"):  # Anthropic's system prompt, the Responses API's instructions
        if body.get(name):
            yield _text(body[name]), True
    for name in ("messages", "input", "prompt"):
        value = body.get(name)
        if isinstance(value, str):
            yield from ((value[start:start + PROMPT_PART], False)
                        for start in range(0, len(value) - PROMPT_PART + 1, PROMPT_PART))
        elif isinstance(value, list):
            yield from ((_text(item), isinstance(item, dict) and item.get("role") in PREAMBLE_ROLES)
                        for item in value)


def _text(item) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("content"), str):
        return f"{item.get('role')}\0{item['content']}"
    return json.dumps(_rendered(item), sort_keys=True)  # parts with images, tool calls, blocks: the exact form matters


def _rendered(value):
    """value without the fields llama.cpp never renders (NOT_RENDERED), at any depth."""
    if isinstance(value, dict):
        return {name: _rendered(field) for name, field in value.items() if name not in NOT_RENDERED}
    if isinstance(value, list):
        return [_rendered(field) for field in value]
    return value
