"""A model's identity: what a saved slot state is only valid under. The model file (its real path, size and
modification time), llama.cpp's flags that shape a slot's state (context size, cache types, parallel, ...) with the
files they name (adapters, projector, draft: size and mtime too) and the llama.cpp build. A state made under
another identity lives in another directory and is never restored."""
import hashlib
import json
import os

# Flags that change nothing in a slot's state, each with whether it takes a value: where the process listens, what
# it is called, its keys, its thread counts, where states go, its host-memory prompt cache, its metrics. The model
# path is left out too: the file itself (real path, size, mtime) is part of the identity.
NEUTRAL_FLAGS = {
    "--host": True, "--port": True, "--slot-save-path": True, "--alias": True, "-a": True,
    "--api-key": True, "--api-key-file": True, "--threads": True, "-t": True, "--threads-batch": True,
    "-tb": True, "--threads-http": True, "--model": True, "-m": True, "--cache-ram": True, "-cram": True,
    "--metrics": False,
}
# Also neutral: any flag spelled like these (--threads-draft, --threads-batch-draft, ...).
NEUTRAL_PREFIXES = ("--threads", "--api-key")


def _neutral(flag: str) -> bool:
    return flag in NEUTRAL_FLAGS or flag.startswith(NEUTRAL_PREFIXES)


def state_flags(flags) -> list:
    """llama.cpp's flags without those that do not change a slot's state (and their values)."""
    kept, tokens = [], [str(token) for token in flags]
    index = 0
    while index < len(tokens):
        token = tokens[index]
        name = token.split("=", 1)[0]
        if token.startswith("-") and _neutral(name):
            # --flag=value carries its value; a neutral flag not in the table is taken to have one when the next
            # token is not a flag.
            takes_value = NEUTRAL_FLAGS.get(name, index + 1 < len(tokens) and not tokens[index + 1].startswith("-"))
            index += 1 if "=" in token or not takes_value else 2
            continue
        kept.append(token)
        index += 1
    return kept


def model_identity(model_path, flags, build: str) -> str:
    """16 hex characters naming this model file + state-shaping flags (and the files they name) + llama.cpp build."""
    real = os.path.realpath(model_path)
    stat = os.stat(real)
    kept = state_flags(flags)
    described = json.dumps({"model": real, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                            "flags": kept, "files": named_files(kept), "build": build}, sort_keys=True)
    return hashlib.blake2b(described.encode(), digest_size=8).hexdigest()


def named_files(flags) -> list:
    """[path, size, mtime_ns] of every existing file a flag names (--lora, --control-vector, --mmproj,
    --model-draft, ...; also as --flag=path): an adapter replaced under the same path shapes states anew."""
    files = []
    for token in flags:
        value = token.split("=", 1)[1] if token.startswith("-") and "=" in token else token
        if value.startswith("-") or not os.path.isfile(value):
            continue
        stat = os.stat(value)
        files.append([os.path.realpath(value), stat.st_size, stat.st_mtime_ns])
    return files


def llama_build(binary=None) -> str:
    """The llama.cpp build: a llama-server binary's path, size and mtime, else the xllamacpp package's version."""
    if binary:
        real = os.path.realpath(binary)
        stat = os.stat(real)
        return f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "xllamacpp " + version("xllamacpp")
    except PackageNotFoundError:
        return "xllamacpp unknown"
