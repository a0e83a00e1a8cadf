"""The keys in memory, by digest: what every request's key is looked up in, kept fresh from the database.

A lookup is a sha256, a dict get and a constant-time compare: no lock, no database. A background thread calls
refresh() every second; it reads only the rows changed since a little before the last one (by the database's own
clock; the overlap catches transactions that committed late), and all rows now and then, in case anything slipped
by: with 10,000 keys, a second's refresh reads the few changed lately, not all of them.
"""
import hashlib
import hmac
import logging
import threading
import time
from collections import OrderedDict

from sqlalchemy import or_, select

from . import schema
from .engine import database_now
from .errors import StoreUnavailable
from .health import is_outage
from .stored_key import key_from_row

log = logging.getLogger(__name__)

SECRET_PREFIX = "sk-gw-"
# Rows changed up to this long before the last refresh are read again: a transaction that took its time stamp
# before that refresh but committed after it is still picked up.
OVERLAP_S = 10.0
FULL_RELOAD_S = 300.0
# An unknown digest is asked of the database at most once in this long, and at most this many a second in
# all: a just-made key works at once, a flood of wrong keys stays in memory.
MISS_TTL_S = 5.0
MISSES_KEPT = 10_000
MISS_QUERIES_PER_S = 20


def digest_of(secret: str) -> str:
    """The sha256 hex digest of a secret: all that is stored of it."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class KeyCache:
    """Stored keys by digest (a rotated key's old digest too, with its end), refreshed from the database."""

    def __init__(self, engine, health, failure, clock):
        self.engine, self.health, self.failure, self.clock = engine, health, failure, clock
        self.by_digest = {}    # digest -> (StoredKey, digest, valid until or None)
        self.by_id = {}        # key id -> (StoredKey, digest, old digest, old digest's end, row's updated_at)
        self.listeners = []
        self._write = threading.Lock()
        self._misses = OrderedDict()
        self._miss_window = (0, 0)  # (second, queries made in it)
        self._since = None          # the next refresh reads rows with updated_at past this (database clock)
        self._full_at = 0.0

    def lookup(self, secret: str):
        """The StoredKey whose secret this is (revoked and expired ones too), or None."""
        if not secret.startswith(SECRET_PREFIX):
            return None  # not one of ours: never worth asking the database
        digest = digest_of(secret)
        found = self.by_digest.get(digest) or self._ask_database(digest)
        if found is None or not hmac.compare_digest(found[1], digest):
            return None
        key, _, until = found
        if until is not None and self.clock() >= until:
            return None  # a rotated key's old secret, past its grace
        return key

    def _ask_database(self, digest):
        now = time.monotonic()
        with self._write:
            asked = self._misses.get(digest)
            if asked is not None and now - asked < MISS_TTL_S:
                return None
            second, count = self._miss_window
            count = count + 1 if second == int(now) else 1
            self._miss_window = (int(now), count)
            if count > MISS_QUERIES_PER_S:
                return None
            self._misses[digest] = now
            self._misses.move_to_end(digest)
            while len(self._misses) > MISSES_KEPT:
                self._misses.popitem(last=False)
        if not self.health.healthy:
            return self._unreachable()
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(select(schema.keys).where(
                    or_(schema.keys.c.digest == digest, schema.keys.c.old_digest == digest))).all()
        except Exception as error:
            if not is_outage(error):
                raise
            self.health.failed(error)
            return self._unreachable()
        self.apply(rows)
        return self.by_digest.get(digest)

    def _unreachable(self):
        if self.failure == "closed":
            raise StoreUnavailable()
        return None

    def refresh(self, connection) -> list:
        """Read the rows changed lately (all of them at first and now and then); apply them; return the changed."""
        table = schema.keys
        full = self._since is None or time.monotonic() - self._full_at >= FULL_RELOAD_S
        database_time = connection.execute(select(database_now(self.engine))).scalar()
        query = select(table) if full else select(table).where(table.c.updated_at > self._since)
        rows = connection.execute(query).all()
        if full:
            self._full_at = time.monotonic()
            gone = set(self.by_id) - {row.id for row in rows}
            with self._write:
                for key_id in gone:
                    self._forget(key_id)
        self._since = float(database_time) - OVERLAP_S  # PostgreSQL answers a Decimal
        return self.apply(rows)

    def apply(self, rows) -> list:
        """Put rows in the cache; tell the listeners about the keys that changed; return those keys."""
        changed = []
        with self._write:
            for row in rows:
                stale = self.by_id.get(row.id)
                if stale is not None and row.updated_at < stale[4]:
                    continue  # read before a change this cache has already (a refresh racing a revoke here)
                entry = (key_from_row(row), row.digest, row.old_digest, row.old_digest_until, row.updated_at)
                if stale is not None and stale[:4] == entry[:4]:
                    self.by_id[row.id] = entry
                    continue
                # The new digests are in before the stale ones go: a lookup meanwhile never misses the key.
                key, digest, old_digest, old_until, _ = entry
                self.by_digest[digest] = (key, digest, None)
                if old_digest and old_until is not None:
                    self.by_digest[old_digest] = (key, old_digest, old_until)
                self.by_id[row.id] = entry
                if stale is not None:
                    for digest_then in stale[1:3]:
                        if digest_then and digest_then not in (digest, old_digest):
                            self.by_digest.pop(digest_then, None)
                self._misses.pop(digest, None)
                changed.append(key)
        if changed:
            self._tell(changed)
        return changed

    def _forget(self, key_id):
        _, digest, old_digest, *_ = self.by_id.pop(key_id)
        for gone in (digest, old_digest):
            if gone:
                self.by_digest.pop(gone, None)

    def _tell(self, changed):
        for listener in list(self.listeners):
            try:
                listener(changed)
            except Exception:
                log.exception("a key-change listener failed")
