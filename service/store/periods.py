"""UTC hours, days and months as epoch seconds: usage rows are per hour, budgets per day or month."""
from datetime import datetime, timezone
from functools import lru_cache

HOUR_S = 3600
DAY_S = 86400


def hour_of(when: float) -> int:
    """The start of when's UTC hour."""
    return int(when // HOUR_S) * HOUR_S


def _month_start(when: float, months_later=0) -> float:
    return _month_start_of_hour(hour_of(when), months_later)


@lru_cache(maxsize=64)
def _month_start_of_hour(hour: int, months_later: int) -> float:
    # Asked of every request with a monthly budget: worked out once an hour (a month begins on an hour).
    moment = datetime.fromtimestamp(hour, timezone.utc)
    month = moment.year * 12 + moment.month - 1 + months_later
    return datetime(month // 12, month % 12 + 1, 1, tzinfo=timezone.utc).timestamp()


# per -> (start of the period holding when, start of the next one)
PERIODS = {
    "hour": (lambda when: float(hour_of(when)), lambda when: float(hour_of(when) + HOUR_S)),
    "day": (lambda when: float(int(when // DAY_S) * DAY_S), lambda when: float(int(when // DAY_S) * DAY_S + DAY_S)),
    "month": (_month_start, lambda when: _month_start(when, 1)),
}


def period_start(per: str, now: float) -> float:
    """When the UTC hour, day or month holding now began."""
    return PERIODS[per][0](now)


def period_end(per: str, now: float) -> float:
    """When the UTC hour, day or month holding now ends: a budget's reset."""
    return PERIODS[per][1](now)


def iso(when: float) -> str:
    """Epoch seconds as ISO-8601 UTC (2024-05-01T13:00:00Z)."""
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
