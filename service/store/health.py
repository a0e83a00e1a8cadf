"""Whether the database answers, with one warning when it stops and one when it is back."""
import logging
import threading

from sqlalchemy.exc import DBAPIError, IntegrityError, TimeoutError as PoolTimeout

log = logging.getLogger(__name__)

def is_outage(error) -> bool:
    """True for a failure to reach the database (not for a refused statement, such as a duplicate name)."""
    if isinstance(error, PoolTimeout):
        return True
    return isinstance(error, DBAPIError) and not isinstance(error, IntegrityError)


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
