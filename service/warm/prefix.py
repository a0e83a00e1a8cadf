"""A prompt's prefixes as a chain of stable hashes: the system prompt, then each message (or each PROMPT_PART
characters of a plain prompt). key_n = blake2b(key_{n-1} + part), so two prompts share keys exactly up to where they
diverge, and the same body gives the same keys in every process (the saved states on disk are named by them)."""
import hashlib
import json

# A plain prompt (completions, a string input) is cut into parts of this many characters.
PROMPT_PART = 1024
KEY_BYTES = 16


def prefix_keys(body: dict) -> list:
    """Hashes (16 bytes each) of the request's prompt prefixes, shortest first."""
    keys, key = [], b""
    for part in _parts(body):
        # The previous key has a fixed length, so key + part is never ambiguous.
        key = hashlib.blake2b(key + part.encode("utf-8", "surrogatepass"), digest_size=KEY_BYTES).digest()
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
