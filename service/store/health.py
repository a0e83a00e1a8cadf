"""Whether the database answers, with one warning when it stops and one when it is back."""
import logging
import threading

from sqlalchemy.exc import DBAPIError, InterfaceError, InternalError, OperationalError, TimeoutError as PoolTimeout

log = logging.getLogger(__name__)

# What says the database cannot be reached or written: connection refused, lost or timed out (SQLite: locked too
# long), the driver's interface failing, no pool connection in time, the database in a state that refuses writes
# (read-only: a standby, a primary demoted in a failover). Anything else is a statement the database refused (a
# duplicate name, a value too long or out of range): that one statement failed, the database is up.
OUTAGES = (OperationalError, InterfaceError, InternalError, PoolTimeout)


def is_outage(error) -> bool:
    """True for a failure to reach the database; False for a refused statement (it says nothing of the database)."""
    if isinstance(error, OUTAGES):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)  # a disconnect SQLAlchemy saw


def reason(error) -> str:
    """One line on why, without the statement or its parameters (SQLAlchemy appends both to its messages)."""
    cause = getattr(error, "orig", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


class Health:
    """The database's state as the store last saw it; every change is logged once."""

    def __init__(self):
        self.healthy = True
        self._lock = threading.Lock()

    def failed(self, error):
        """Note that the database could not be reached."""
        with self._lock:
            was, self.healthy = self.healthy, False
        if was:
            log.warning("database unreachable (%s): known keys are served from the cache, usage waits in memory",
                        reason(error))

    def succeeded(self):
        """Note that the database answered."""
        if self.healthy:
            return
        with self._lock:
            was, self.healthy = self.healthy, True
        if not was:
            log.warning("database reachable again: pending usage is being written")
