"""Keys made at run time: created, listed, updated, rotated and revoked in the database, looked up in memory."""
import contextlib
import secrets

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from . import schema
from .engine import database_now
from .errors import KeyNameTaken, KeyNotFound, StoreUnavailable
from .health import is_outage
from .key_cache import SECRET_PREFIX, KeyCache, digest_of
from .stored_key import column_values, key_from_row


def new_secret() -> str:
    """A new key's secret: the prefix and 40 URL-safe characters (240 random bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(30)


# How much later than its last stamp a changed row is stamped, at least (the database clock may step back).
STAMP_STEP_S = 0.001

class KeyStore:
    """The stored keys: admin operations go to the database; lookups are answered from the cache."""

    def __init__(self, engine, health, failure="open", clock=None):
        self.engine, self.health, self.clock = engine, health, clock
        self.cache = KeyCache(engine, health, failure, clock)
        self._now = database_now(engine)

    def lookup(self, secret: str):
        """The StoredKey of this secret (revoked or expired too: the caller says why it refuses), or None."""
        return self.cache.lookup(secret)

    def cached(self) -> list:
        """Every key in memory (no database call), for pages and listeners that want them all."""
        return [entry[0] for entry in list(self.cache.by_id.values())]

    def on_change(self, listener):
        """Call listener(list of the StoredKeys that changed) after each change seen, here or on another gateway."""
        self.cache.listeners.append(listener)

    def create(self, name, **fields):
        """Make a key; return (StoredKey, its secret): the only time the secret is ever seen."""
        values = column_values({"name": name, **fields})
        secret, key_id, now = new_secret(), "key_" + secrets.token_hex(6), self.clock()
        with self._transaction() as connection:
            connection.execute(insert(schema.keys).values(
                id=key_id, digest=digest_of(secret), prefix=secret[:8], created_at=now, updated_at=self._now,
                **values))
            row = self._row(connection, key_id)
        return self._learn(row), secret

    def list(self) -> list:
        """Every stored key, oldest first."""
        with self._transaction() as connection:
            rows = connection.execute(select(schema.keys).order_by(schema.keys.c.created_at)).all()
        return [key_from_row(row) for row in rows]

    def get(self, key_id):
        """The stored key with this id, or None."""
        with self._transaction() as connection:
            row = connection.execute(select(schema.keys).where(schema.keys.c.id == key_id)).first()
        return key_from_row(row) if row else None

    def update(self, key_id, **fields):
        """Change any of a key's EDITABLE fields; return the key as it now is."""
        values = column_values(fields)
        with self._transaction() as connection:
            self._change(connection, key_id, **values)
            row = self._row(connection, key_id)
        return self._learn(row)

    def rotate(self, key_id, grace_s: float):
        """Give the key a new secret; the old one keeps working for grace_s seconds. Return (key, new secret)."""
        secret = new_secret()
        with self._transaction() as connection:
            row = self._row(connection, key_id)
            old = {"old_digest": row.digest, "old_digest_until": self.clock() + grace_s} if grace_s > 0 else \
                {"old_digest": None, "old_digest_until": None}
            self._change(connection, key_id, digest=digest_of(secret), prefix=secret[:8], **old)
            row = self._row(connection, key_id)
        return self._learn(row), secret

    def revoke(self, key_id):
        """Revoke the key (from its first revocation on: revoking twice keeps the first time)."""
        with self._transaction() as connection:
            if self._row(connection, key_id).revoked_at is None:
                self._change(connection, key_id, revoked_at=self.clock())
            row = self._row(connection, key_id)
        return self._learn(row)

    def _row(self, connection, key_id):
        row = connection.execute(select(schema.keys).where(schema.keys.c.id == key_id).with_for_update()).first()
        if row is None:
            raise KeyNotFound(f"No key with id {key_id!r}", param="id")
        return row

    def _change(self, connection, key_id, **values):
        # Never earlier than the row's last stamp, even when the database's clock stepped back (NTP, a failover to
        # a server behind): a cache skips a row older than the one it holds, and would never learn of a revoke.
        later = schema.keys.c.updated_at + STAMP_STEP_S
        stamp = (func.greatest if self.engine.dialect.name == "postgresql" else func.max)(self._now, later)
        done = connection.execute(update(schema.keys).where(schema.keys.c.id == key_id)
                                  .values(updated_at=stamp, **values))
        if done.rowcount == 0:
            raise KeyNotFound(f"No key with id {key_id!r}", param="id")

    def _learn(self, row):
        # Once committed, the cache learns at once: a key made or revoked here acts here before the next refresh.
        self.cache.apply([row])
        return key_from_row(row)

    @contextlib.contextmanager
    def _transaction(self):
        try:
            with self.engine.begin() as connection:
                yield connection
        except IntegrityError as error:
            raise KeyNameTaken("A key with this name exists already", param="name") from error
        except Exception as error:
            if not is_outage(error):
                raise
            self.health.failed(error)
            raise StoreUnavailable() from error
        self.health.succeeded()
