"""Usage per key, model and hour: counted in memory on the request path, written by the store's thread.

record() only adds to an in-memory aggregate (a lock held for a few additions). Every second the store's thread
takes the aggregate and upserts it in one transaction; while the database is down the aggregate stays and grows
(bounded: past MAX_PENDING rows, new rows are dropped and counted), and is written when the database is back.
spent() answers budgets from the database's totals, read in the background, plus what is not written yet.
"""
import logging
import threading
import time

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError

from . import schema
from .errors import StoreUnavailable
from .health import is_outage
from .periods import hour_of, period_end, period_start
from .spent import SpentTotals
from .usage_query import usage_rows

__all__ = ["UsageStore", "period_end"]

log = logging.getLogger(__name__)

MAX_PENDING = 100_000
# The usage table's name columns hold this many characters; a longer name (a model a client named) is cut to fit.
KEY_CHARS = schema.usage.c.key.type.length
MODEL_CHARS = schema.usage.c.model.type.length
UPSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


def _merge(into: dict, rows: dict) -> int:
    """Add rows ({key: {(model, hour): counters}}) into into; return how many rows into gained."""
    added = 0
    for key, by_model_hour in rows.items():
        target = into.setdefault(key, {})
        for model_hour, counters in by_model_hour.items():
            mine = target.get(model_hour)
            if mine is None:
                target[model_hour] = list(counters)
                added += 1
            else:
                for index, value in enumerate(counters):
                    mine[index] += value
    return added


def _row(key, model_hour, counters) -> dict:
    """The usage table's row of one pending (key, (model, hour)) and its counters."""
    return {"key": key, "model": model_hour[0], "hour": model_hour[1], **dict(zip(schema.USAGE_COUNTERS, counters))}


class UsageStore:
    """Usage counted here and kept in the database."""

    def __init__(self, engine, health, clock):
        self.engine, self.health, self.clock = engine, health, clock
        self.dropped = 0
        self._lock = threading.Lock()
        self._pending = {}   # key -> {(model, hour): [requests, prompt, completion, errors, queue_ms, upstream_ms]}
        self._rows = 0
        self._writing = {}   # what the writer took, until its transaction commits
        self._one_writer = threading.Lock()  # the store's thread and close() (or a test) may both flush
        self.totals = SpentTotals(engine)

    def record(self, key, model, prompt_tokens, completion_tokens, error, queue_ms, upstream_ms, when=None):
        """Count one finished request (never waits on the database)."""
        model_hour = ((model or "")[:MODEL_CHARS], hour_of(self.clock() if when is None else when))
        with self._lock:
            by_model_hour = self._pending.setdefault(key[:KEY_CHARS], {})
            counters = by_model_hour.get(model_hour)
            if counters is None:
                if self._rows >= MAX_PENDING:
                    self.dropped += 1
                    return
                counters = by_model_hour[model_hour] = [0, 0, 0, 0, 0.0, 0.0]
                self._rows += 1
            counters[0] += 1
            counters[1] += prompt_tokens or 0
            counters[2] += completion_tokens or 0
            counters[3] += 1 if error else 0
            counters[4] += queue_ms or 0.0
            counters[5] += upstream_ms or 0.0

    @property
    def pending(self) -> int:
        """Rows (key, model, hour) counted here and not written yet."""
        return self._rows + sum(len(rows) for rows in list(self._writing.values()))

    def flush(self) -> int:
        """Write what is pending in one transaction; return the rows written. When the database cannot be reached,
        it stays pending; a row the database refuses (and only it) is dropped, counted in dropped and logged."""
        with self._one_writer:
            return self._flush()

    def _flush(self) -> int:
        with self._lock:
            self._writing, self._pending, self._rows = self._pending, {}, 0
        try:
            rows = [_row(key, model_hour, counters) for key, by_model_hour in self._writing.items()
                    for model_hour, counters in by_model_hour.items()]
            if not rows:
                return 0
            try:
                self._upsert(rows)
            except Exception as error:
                if is_outage(error):
                    raise
                return self._write_one_by_one()
            self.totals.written(self._writing)
            self._writing = {}
            return len(rows)
        except BaseException:
            with self._lock:
                self._rows += _merge(self._pending, self._writing)
                self._writing = {}
            raise

    def _upsert(self, rows):
        upsert = UPSERTS[self.engine.dialect.name](schema.usage)
        upsert = upsert.on_conflict_do_update(
            index_elements=["key", "model", "hour"],
            set_={name: schema.usage.c[name] + upsert.excluded[name] for name in schema.USAGE_COUNTERS})
        with self.engine.begin() as connection:
            connection.execute(upsert, rows)

    def _write_one_by_one(self) -> int:
        # The database refused the batch: each row in its own transaction, so that one bad row (PostgreSQL aborts
        # the whole transaction at the first) costs only itself. Done rows leave _writing as they go: an outage
        # midway puts back only the others. The model may be a client's text: only its length is logged.
        written = 0
        for key, by_model_hour in list(self._writing.items()):
            for model_hour, counters in list(by_model_hour.items()):
                try:
                    self._upsert([_row(key, model_hour, counters)])
                    self.totals.written({key: {model_hour: counters}})
                    written += 1
                except Exception as error:
                    if is_outage(error) or not refuses_the_row(error):
                        raise  # kept, to be written when the database takes it
                    self.dropped += 1
                    log.error("usage row dropped, refused by the database (%s): key %s, hour %d, model of %d "
                              "characters", type(getattr(error, "orig", None) or error).__name__, key,
                              model_hour[1], len(model_hour[0]))
                with self._lock:  # query() reads _writing under it
                    del by_model_hour[model_hour]
            with self._lock:
                del self._writing[key]
        return written

    def refresh_spent(self, connection):
        """Read the database's totals for budgets (the store's thread, every second)."""
        self.totals.refresh(connection, self.clock())

    def spent(self, key: str, per: str, now=None):
        """(tokens, requests) of key in the current UTC day or month: every gateway's, this one's unwritten too."""
        now = self.clock() if now is None else now
        start = period_start(per, now)
        tokens, requests = self.totals.spent(key, per, now)
        for rows in (self._pending, self._writing):
            for (_, hour), counters in list(rows.get(key, {}).items()):
                if hour >= start:
                    tokens += counters[1] + counters[2]
                    requests += counters[0]
        return tokens, requests

    def query(self, start: float, end: float, group_by="hour", key=None, model=None) -> list:
        """Usage rows summed per period (hour, day or month, UTC), key and model, for the hours overlapping
        [start, end); what is not written yet included. Rows: {"period", "key", "model", "requests",
        "prompt_tokens", "completion_tokens", "errors", "queue_ms", "upstream_ms"}; model None when unknown."""
        with self._lock:
            unwritten = {}
            _merge(unwritten, self._writing)
            _merge(unwritten, self._pending)
        try:
            with self.engine.connect() as connection:
                return usage_rows(connection, unwritten, start, end, group_by, key, model)
        except Exception as error:
            if not is_outage(error):
                raise
            self.health.failed(error)
            raise StoreUnavailable() from error

    def flush_until(self, deadline: float) -> bool:
        """Try to write what is pending until deadline (monotonic); True once nothing is left."""
        while True:
            try:
                self.flush()
                return True
            except Exception as error:
                if not is_outage(error):
                    log.exception("usage could not be written")
                    return False
                self.health.failed(error)
                if time.monotonic() + 0.2 >= deadline:
                    log.warning("usage not written at close: %d rows lost", self.pending)
                    return False
                time.sleep(0.2)


def refuses_the_row(error) -> bool:
    """Whether the database refused the row itself (a value it cannot hold), so that writing it again can never
    succeed: only then is a usage row dropped. Whatever else failed may pass: the row waits."""
    return isinstance(error, (DataError, IntegrityError, OverflowError, ValueError))
