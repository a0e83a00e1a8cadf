"""The disk the saved states may take, over every model identity under one root: the least recently used states go
first (of any model); a disk nearly full skips saving with one warning, never an error."""
import logging
import os
import re
import shutil
import threading

from .index import StateIndex

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Free space a save must leave on the disk: 512 MiB, or 5% of a disk smaller than 10 GiB.
MARGIN_BYTES = 512 * MIB
MARGIN_SHARE = 0.05
IDENTITY = re.compile(r"^[0-9a-f]{16}$")  # model_identity's form: the only directories under root that are ours


class DiskBudget:
    """Every StateIndex under root (one directory per identity), kept within limit_mib together."""

    def __init__(self, root, limit_mib: int, margin_bytes: int = None):
        self.root = root
        self.limit_bytes = int(limit_mib) * MIB
        self.margin_bytes = margin_bytes  # None: MARGIN_BYTES, or MARGIN_SHARE of a small disk
        self._indexes = {}
        self._lock = threading.Lock()
        self._enforcing = threading.Lock()  # two models' saves ending at once delete once, not twice as much
        self._warned = False

    def index(self, identity: str, model: str = None) -> StateIndex:
        """The one StateIndex of identity (opened on first use, shared by every model of that identity)."""
        with self._lock:
            return self._index(identity, model)

    def _index(self, identity, model=None):
        index = self._indexes.get(identity)
        if index is None:
            index = self._indexes[identity] = StateIndex(os.path.join(self.root, identity), identity, model)
        elif model and index.model != model:
            index.model = model
        return index

    def indexes(self) -> list:
        """Every identity's index under root, also those of models not loaded now (their states count too)."""
        with self._lock:
            try:
                names = os.listdir(self.root)
            except OSError:
                names = []
            for name in names:
                if IDENTITY.match(name) and os.path.isdir(os.path.join(self.root, name)):
                    self._index(name)
            return list(self._indexes.values())

    def total_bytes(self) -> int:
        """The bytes every indexed state under root takes."""
        return sum(index.total_bytes() for index in self.indexes())

    def enforce(self) -> int:
        """Delete the least recently used states (of any identity) until the total is within the limit; returns
        how many were deleted."""
        with self._enforcing:
            return self._enforce(self.indexes())

    def _enforce(self, indexes) -> int:
        by_age = sorted(((entry["last_use"], index, key, entry["bytes"]) for index in indexes
                         for key, entry in index.entries().items()), key=lambda item: item[0])
        total = sum(item[3] for item in by_age)
        deleted = 0
        for _, index, key, nbytes in by_age:
            if total <= self.limit_bytes:
                break
            index.drop(key)
            total -= nbytes
            deleted += 1
        if deleted:
            log.info("warm: %d saved state(s) deleted to stay within %d MiB", deleted, self.limit_bytes // MIB)
        return deleted

    def room_for(self, nbytes: int) -> bool:
        """False when saving nbytes more would leave the disk with less than the margin free, or could never fit
        the limit; it warns once until a save succeeds again (saved())."""
        try:
            usage = shutil.disk_usage(self.root if os.path.isdir(self.root) else _existing_parent(self.root))
        except OSError:
            return True  # no answer about free space: the save itself will say if the disk is full
        margin = self.margin_bytes if self.margin_bytes is not None else min(MARGIN_BYTES, MARGIN_SHARE * usage.total)
        if nbytes <= self.limit_bytes and usage.free - nbytes >= margin:
            return True
        if not self._warned:
            self._warned = True
            log.warning("warm: not saving conversation states: %d MiB free on the disk of %s (a save keeps %d MiB "
                        "free), or a state would not fit KV_CACHE_DISK_MIB", usage.free // MIB, self.root,
                        margin // MIB)
        return False

    def saved(self):
        """A save succeeded: a later lack of room is worth one warning again."""
        self._warned = False


def _existing_parent(path):
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path
