"""Keys made at run time, budgets and usage, kept in a database (SQLite by default, PostgreSQL for several
gateways): open_store() migrates it and starts the thread that keeps memory and database in step.

The request path never waits on the database: keys are looked up in a cache, usage is counted in memory.
One thread per store, every second, writes the usage, reads the keys changed anywhere (other gateways sharing
the database included) and the budgets' totals. When the database is down, that thread keeps trying, and
`healthy` says so.
"""
import logging
import threading
import time

from .engine import make_engine, migrate
from .errors import KeyNameTaken, KeyNotFound, StoreError, StoreUnavailable
from .health import Health, is_outage, reason
from .keys import KeyStore
from .periods import period_end
from .stored_key import StoredKey
from .usage import UsageStore

__all__ = ["open_store", "init_store", "Store", "StoreError", "StoredKey", "KeyNotFound", "KeyNameTaken",
           "StoreUnavailable", "period_end"]

log = logging.getLogger(__name__)

SYNC_EVERY_S = 1.0
CLOSE_FLUSH_S = 5.0


class Store:
    """The database, the key cache and the usage counted here; close() writes what is left and stops."""

    def __init__(self, engine, failure="open", clock=time.time):
        self.engine, self.failure, self.clock = engine, failure, clock
        self.health = Health()
        self.keys = KeyStore(engine, self.health, failure, clock)
        self.usage = UsageStore(engine, self.health, clock)
        self._stop = threading.Event()
        self._closed = False
        self._one_round = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="store-sync", daemon=True)

    @property
    def healthy(self) -> bool:
        """False while the database cannot be reached."""
        return self.health.healthy

    def start(self):
        """Read every key and the budgets' totals, then keep memory and database in step every second."""
        with self.engine.connect() as connection:
            self._read(connection)  # a budget counts what was spent from the first request on, not a second later
        self._thread.start()
        return self

    def sync(self):
        """One round: write the usage, read the changed keys and the budgets' totals. Raises on a failure."""
        with self._one_round:
            unwritten = None
            try:
                self.usage.flush()
            except Exception as error:
                unwritten = error  # the keys are read all the same: a revoke never waits on the usage
            with self.engine.connect() as connection:
                self._read(connection)
            if unwritten is not None:
                raise unwritten
        self.health.succeeded()

    def _read(self, connection):
        self.keys.cache.refresh(connection)
        if any(key.has_budget for key in self.keys.cached()):
            self.usage.refresh_spent(connection)

    def _run(self):
        while not self._stop.wait(SYNC_EVERY_S):
            try:
                self.sync()
            except Exception as error:
                if is_outage(error):
                    self.health.failed(error)
                else:
                    log.exception("store: a round of writing usage and reading keys failed")

    def close(self):
        """Write the pending usage (waiting CLOSE_FLUSH_S at most for the database), stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        deadline = time.monotonic() + CLOSE_FLUSH_S
        if self._thread.is_alive():
            self._thread.join(CLOSE_FLUSH_S)
        self.usage.flush_until(deadline)
        self.engine.dispose()


def open_store(url: str, *, failure="open", clock=time.time) -> Store:
    """Open (making it if needed) and migrate the database at url; return the started Store. StoreError if not."""
    engine = make_engine(url)
    try:
        migrate(engine)
        return Store(engine, failure, clock).start()
    except StoreError:
        engine.dispose()
        raise
    except Exception as error:
        engine.dispose()
        if not is_outage(error):
            raise
        raise StoreError(f"database unreachable at start ({reason(error)})") from None


def init_store(app, settings) -> None:
    """app.extensions["store"]: the Store of DATABASE_URL, or None when it is unset."""
    url = settings.get("DATABASE_URL")
    app.extensions["store"] = open_store(url, failure=settings.get("DATABASE_FAILURE") or "open") if url else None
