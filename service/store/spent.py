"""Every key's tokens and requests in the current UTC day and month, as the database has them (all gateways').

Reading a month of rows every second would not scale, so the totals come in two parts: the hours before a
cutoff (an hour or two back), summed once a minute, and the hours since the cutoff, summed every second. What
this gateway writes is added at once, so that nothing it counted is missing between its write and the next read.
"""
import time

from sqlalchemy import func, select

from . import schema
from .periods import HOUR_S, hour_of, period_start

BASE_REFRESH_S = 60.0
BUDGET_PERIODS = ("day", "month")


def _sums(connection, *where, by_hour=False):
    usage = schema.usage
    columns = [usage.c.key] + ([usage.c.hour] if by_hour else [])
    query = select(*columns, func.sum(usage.c.prompt_tokens + usage.c.completion_tokens), func.sum(usage.c.requests))
    return connection.execute(query.where(*where).group_by(*columns)).all()


class SpentTotals:
    """The database's usage totals per key for budgets, refreshed by the store's thread."""

    def __init__(self, engine):
        self.engine = engine
        self._base_at = None
        # (per -> (period start, {key: (tokens, requests)}) before the cutoff, cutoff, {key: {hour: (tokens,
        # requests)}} from the cutoff on), replaced as one so that a reader never mixes two refreshes.
        self._state = ({}, 0, {})

    def refresh(self, connection, now: float):
        """Read the recent hours' totals (and the older hours' once a minute, or when a period turned)."""
        base, cutoff, _ = self._state
        turned = any(base.get(per, (None,))[0] != period_start(per, now) for per in BUDGET_PERIODS)
        if turned or self._base_at is None or time.monotonic() - self._base_at >= BASE_REFRESH_S:
            cutoff = hour_of(now) - HOUR_S
            base = {}
            for per in BUDGET_PERIODS:
                start = period_start(per, now)
                rows = _sums(connection, schema.usage.c.hour >= start, schema.usage.c.hour < cutoff)
                base[per] = (start, {key: (int(tokens), int(requests)) for key, tokens, requests in rows})
            self._base_at = time.monotonic()
        recent = {}
        for key, hour, tokens, requests in _sums(connection, schema.usage.c.hour >= cutoff, by_hour=True):
            recent.setdefault(key, {})[hour] = (int(tokens), int(requests))
        self._state = (base, cutoff, recent)

    def written(self, rows: dict):
        """Add what this gateway just wrote ({key: {(model, hour): counters}}) until the next refresh reads it."""
        base, cutoff, recent = self._state
        for key, by_model_hour in rows.items():
            for (_, hour), counters in by_model_hour.items():
                tokens, requests = counters[1] + counters[2], counters[0]
                if hour >= cutoff:
                    by_hour = recent.setdefault(key, {})
                    old = by_hour.get(hour, (0, 0))
                    by_hour[hour] = (old[0] + tokens, old[1] + requests)
                    continue
                for start, totals in base.values():
                    if hour >= start:  # a late write (after an outage) into an hour before the cutoff
                        old = totals.get(key, (0, 0))
                        totals[key] = (old[0] + tokens, old[1] + requests)

    def spent(self, key: str, per: str, now: float):
        """(tokens, requests) of key in the period holding now, as last read (plus what was written since)."""
        base, _, recent = self._state
        start = period_start(per, now)
        period = base.get(per)
        # A period that turned since the last refresh: its older hours are not read yet, and there are none.
        tokens, requests = period[1].get(key, (0, 0)) if period and period[0] == start else (0, 0)
        for hour, (hour_tokens, hour_requests) in list(recent.get(key, {}).items()):
            if hour >= start:
                tokens += hour_tokens
                requests += hour_requests
        return tokens, requests
