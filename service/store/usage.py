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

from . import schema
from .errors import StoreUnavailable
from .health import is_outage
from .periods import hour_of, period_end, period_start
from .spent import SpentTotals
from .usage_query import usage_rows

__all__ = ["UsageStore", "period_end"]

log = logging.getLogger(__name__)

MAX_PENDING = 100_000
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
        model_hour = (model or "", hour_of(self.clock() if when is None else when))
        with self._lock:
            by_model_hour = self._pending.setdefault(key, {})
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
        """Write what is pending in one transaction; return the rows written. On failure it stays pending."""
        with self._one_writer:
            return self._flush()

    def _flush(self) -> int:
        with self._lock:
            self._writing, self._pending, self._rows = self._pending, {}, 0
        rows = [{"key": key, "model": model, "hour": hour, **dict(zip(schema.USAGE_COUNTERS, counters))}
                for key, by_model_hour in self._writing.items() for (model, hour), counters in by_model_hour.items()]
        try:
            if rows:
                upsert = UPSERTS[self.engine.dialect.name](schema.usage)
                upsert = upsert.on_conflict_do_update(
                    index_elements=["key", "model", "hour"],
                    set_={name: schema.usage.c[name] + upsert.excluded[name] for name in schema.USAGE_COUNTERS})
                with self.engine.begin() as connection:
                    connection.execute(upsert, rows)
                self.totals.written(self._writing)
        except BaseException:
            with self._lock:
                self._rows += _merge(self._pending, self._writing)
                self._writing = {}
            raise
        self._writing = {}
        return len(rows)

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
