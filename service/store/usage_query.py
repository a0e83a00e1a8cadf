"""Usage summed per hour, day or month (UTC), key and model: the database's rows and the unwritten ones."""
from sqlalchemy import func, select

from . import schema
from .periods import DAY_S, HOUR_S, iso, period_start

GROUPS = ("hour", "day", "month")


def usage_rows(connection, unwritten: dict, start, end, group_by, key, model) -> list:
    """The summed rows (see UsageStore.query); unwritten is {key: {(model, hour): counters}}."""
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {GROUPS}")
    usage = schema.usage
    # The database sums per hour or per day (a month has no fixed length: its days are summed here).
    bucket = usage.c.hour if group_by == "hour" else usage.c.hour - usage.c.hour % DAY_S
    where = [usage.c.hour > start - HOUR_S, usage.c.hour < end]
    if key is not None:
        where.append(usage.c.key == key)
    if model is not None:
        where.append(usage.c.model == (model or ""))
    query = select(bucket.label("bucket"), usage.c.key, usage.c.model,
                   *(func.sum(usage.c[name]) for name in schema.USAGE_COUNTERS))
    found = connection.execute(query.where(*where).group_by(bucket, usage.c.key, usage.c.model)).all()
    rows = [(row[0], row[1], row[2], row[3:]) for row in found]
    for row_key, by_model_hour in unwritten.items():
        for (row_model, hour), counters in by_model_hour.items():
            if (key is None or row_key == key) and (model is None or row_model == (model or "")) \
                    and start - HOUR_S < hour < end:
                rows.append((hour, row_key, row_model, counters))
    totals = {}
    for hour, row_key, row_model, counters in rows:
        group = (period_start(group_by, hour), row_key, row_model)
        into = totals.setdefault(group, [0, 0, 0, 0, 0.0, 0.0])
        for index, value in enumerate(counters):
            into[index] += value or 0
    return [{"period": iso(period), "key": row_key, "model": row_model or None,
             **{name: (round(value, 3) if isinstance(value, float) else int(value))
                for name, value in zip(schema.USAGE_COUNTERS, counters)}}
            for (period, row_key, row_model), counters in sorted(totals.items())]
