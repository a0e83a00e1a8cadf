"""The saved states of one model identity: `<key hex>.state` files in one directory and `index.json` naming them
(tokens, bytes, checksum, last use) and the aliases: a state is also filed under its preamble's key (the tools
and system prompt it begins with), so that a new conversation with the same preamble restores it and llama.cpp
reuses that common part. Written whole or not at all (a temporary file, then os.replace); on open, whatever
does not match (a missing or resized file, a leftover .tmp, a .state the index does not name) is dropped."""
import hashlib
import json
import logging
import os
import re
import threading
import time

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
VERSION = 2  # 2: aliases
READABLE = (1, VERSION)  # version 1 is version 2 without aliases
STATE_SUFFIX = ".state"
TMP_SUFFIX = ".tmp"
KEY_HEX = re.compile(r"^[0-9a-f]{32}$")  # a 16-byte prefix key, the only thing a file here is ever named by
CHUNK = 1024 * 1024


def state_name(key: bytes) -> str:
    """The file name of key's saved state."""
    return key.hex() + STATE_SUFFIX


def tmp_name(key: bytes) -> str:
    """The name llama.cpp writes key's state under before it is renamed to state_name(key)."""
    return key.hex() + TMP_SUFFIX


def file_digest(path) -> str:
    """The blake2b of a state file: llama.cpp aborts (the whole process) on some damaged files, so a file is only
    ever handed to it when it is byte for byte what it wrote."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class StateIndex:
    """Which prefix keys have a saved state in directory, made under identity. Thread-safe."""

    def __init__(self, directory, identity: str, model: str = None, clock=time.time):
        self.directory = directory
        self.identity = identity
        self.model = model  # a name for the operators' page (else the one index.json recorded); not the identity
        self._clock = clock  # wall time: last use must mean something after a gateway restart
        self._lock = threading.RLock()
        self._entries = {}
        self._aliases = {}  # preamble key -> the key of the newest state that begins with that preamble
        self._open()

    def path(self, key: bytes) -> str:
        """Where key's state file is."""
        return os.path.join(self.directory, state_name(key))

    def lookup(self, keys):
        """(key, entry) of the state file for the longest of keys that has one, its own or by alias (key: the
        file's, entry: the file's), whose file is still there; else None."""
        with self._lock:
            self._present()
            for wanted in reversed(keys):
                key = wanted if wanted in self._entries else self._aliases.get(wanted)
                if key is None:
                    continue
                if os.path.isfile(self.path(key)):
                    return key, dict(self._entries[key])
                self._forget(key)  # deleted by hand: fine, it is simply not saved any more
        return None

    def add(self, key: bytes, tokens: int, nbytes: int, digest: str = "", alias: bytes = None):
        """Record that key's state file (already at path(key)) holds tokens tokens in nbytes bytes (its
        file_digest: digest); alias: its preamble's key, to be found under too (the newest state wins it)."""
        with self._lock:
            self._present()
            self._entries[key] = {"tokens": int(tokens), "bytes": int(nbytes), "blake2b": digest,
                                  "last_use": self._clock()}
            if alias is not None and alias != key:
                self._aliases[alias] = key
            self._write()

    def drop(self, key: bytes):
        """Forget key and every alias to it, and delete its file."""
        with self._lock:
            _remove(self.path(key))
            self._forget(key)

    def aliases(self) -> dict:
        """A copy: {preamble key: the key of the state file it names}."""
        with self._lock:
            self._present()
            return dict(self._aliases)

    def touch(self, key: bytes):
        """Mark key as used now (the least recently used states are deleted first)."""
        with self._lock:
            self._present()
            if key in self._entries:
                self._entries[key]["last_use"] = self._clock()
                self._write()

    def entries(self) -> dict:
        """A copy: {key: {"tokens", "bytes", "blake2b", "last_use"}}."""
        with self._lock:
            self._present()
            return {key: dict(entry) for key, entry in self._entries.items()}

    def total_bytes(self) -> int:
        """The bytes the indexed states take on disk."""
        with self._lock:
            self._present()
            return sum(entry["bytes"] for entry in self._entries.values())

    def make_directory(self):
        """Create the directory if it is missing (it may be deleted by hand at any time)."""
        with self._lock:
            self._present()
            os.makedirs(self.directory, exist_ok=True)

    def _present(self):
        """Forget the entries whose files are gone when index.json is (it is there whenever entries are): the
        directory was deleted, or made again by someone else. Those must not count against the disk budget nor be
        written into the next index.json."""
        if not self._entries or os.path.isfile(os.path.join(self.directory, INDEX_FILE)):
            return
        gone = [key for key in self._entries if not os.path.isfile(self.path(key))]
        for key in gone:
            del self._entries[key]
        self._unalias(gone)
        if gone:
            log.info("warm: %s: %d saved state(s) gone with their directory", self.identity, len(gone))

    def _forget(self, key):
        if self._entries.pop(key, None) is not None:
            self._unalias((key,))
            self._write()

    def _unalias(self, keys):
        """Forget the aliases to these (deleted) states."""
        for alias in [alias for alias, key in self._aliases.items() if key in keys]:
            del self._aliases[alias]

    def _write(self):
        target = os.path.join(self.directory, INDEX_FILE)
        try:
            self.make_directory()  # first: a directory deleted meanwhile takes its entries with it
            document = {"version": VERSION, "identity": self.identity, "model": self.model,
                        "entries": {key.hex(): entry for key, entry in self._entries.items()},
                        "aliases": {alias.hex(): key.hex() for alias, key in self._aliases.items()}}
            with open(target + TMP_SUFFIX, "w", encoding="utf-8") as file:
                json.dump(document, file)
            os.replace(target + TMP_SUFFIX, target)
        except OSError as error:
            # The index is rebuilt from what is valid on the next open; a request never fails over it.
            log.warning("warm: cannot write %s: %s", target, error.strerror or error)

    def _open(self):
        with self._lock:
            if not os.path.isdir(self.directory):
                return
            listed, aliases = self._read()
            for keyhex, entry in listed.items():
                key = bytes.fromhex(keyhex)
                try:
                    size = os.path.getsize(self.path(key))
                except OSError:
                    continue
                if size == entry["bytes"]:
                    self._entries[key] = entry
            self._aliases = {bytes.fromhex(alias): bytes.fromhex(keyhex) for alias, keyhex in aliases.items()
                             if bytes.fromhex(keyhex) in self._entries}
            for name in os.listdir(self.directory):
                if self._stale(name):
                    _remove(os.path.join(self.directory, name))
            if len(self._entries) != len(listed) or len(self._aliases) != len(aliases):
                self._write()

    def _stale(self, name) -> bool:
        # A save cut short, or a state the index does not name: never loaded, so never kept. Other files are not ours.
        if name.endswith(TMP_SUFFIX):
            return True
        keyhex = name[:-len(STATE_SUFFIX)]
        return name.endswith(STATE_SUFFIX) and bool(KEY_HEX.match(keyhex)) and bytes.fromhex(keyhex) not in self._entries

    def _read(self) -> tuple:
        """({key hex: entry}, {alias hex: key hex}) of index.json made under this identity; anything unreadable
        counts as empty."""
        try:
            with open(os.path.join(self.directory, INDEX_FILE), encoding="utf-8") as file:
                document = json.load(file)
            if document.get("version") not in READABLE or document.get("identity") != self.identity:
                return {}, {}
            self.model = self.model or document.get("model")
            entries = {keyhex: {"tokens": int(entry["tokens"]), "bytes": int(entry["bytes"]),
                                "blake2b": str(entry["blake2b"]), "last_use": float(entry["last_use"])}
                       for keyhex, entry in document["entries"].items() if KEY_HEX.match(keyhex)}
            aliases = {alias: str(keyhex) for alias, keyhex in document.get("aliases", {}).items()
                       if KEY_HEX.match(alias) and KEY_HEX.match(str(keyhex))}
            return entries, aliases
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}, {}


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("warm: cannot delete %s: %s", os.path.basename(path), error.strerror or error)
