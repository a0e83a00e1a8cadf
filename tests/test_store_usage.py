"""Usage kept per key, model and hour on real SQLite and PostgreSQL: summed per hour, day and month, written in
the background, bounded in memory, flushed at close; budgets' spent counters shared by gateways on one database."""
from datetime import datetime, timezone

import pytest

from service.store import period_end
from service.store import usage as usage_module
from tests.pools import wait_until


def at(text: str) -> float:
    """Epoch seconds of an ISO UTC time."""
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("per, now, end", [
    ("day", "2024-05-31T23:59:59", "2024-06-01T00:00:00"),
    ("day", "2024-06-01T00:00:00", "2024-06-02T00:00:00"),
    ("month", "2024-05-31T23:59:59", "2024-06-01T00:00:00"),
    ("month", "2024-12-15T10:00:00", "2025-01-01T00:00:00"),
    ("month", "2024-02-01T00:00:00", "2024-03-01T00:00:00"),
])
def test_period_end(per, now, end):
    assert period_end(per, at(now)) == at(end)


def test_query_sums_per_hour_day_and_month(database_url, open_stores):
    store = open_stores(database_url)
    record = store.usage.record
    record("key_a", "chat", 10, 5, False, 1.5, 20.0, when=at("2024-05-31T10:15:00"))
    record("key_a", "chat", 1, 2, True, 0.5, 10.0, when=at("2024-05-31T10:45:00"))
    record("key_a", "chat", 100, 0, False, None, None, when=at("2024-05-31T11:00:00"))
    record("key_a", None, 7, 0, True, None, None, when=at("2024-05-31T11:10:00"))
    record("env:team-b", "embed", 3, 0, False, None, None, when=at("2024-06-01T00:05:00"))
    store.sync()
    assert store.usage.pending == 0
    record("key_a", "chat", 1000, 1, False, None, None, when=at("2024-06-02T08:00:00"))  # not written yet

    start, end = at("2024-05-01T00:00:00"), at("2024-07-01T00:00:00")
    hours = store.usage.query(start, end, "hour", key="key_a", model="chat")
    assert [(row["period"], row["requests"], row["prompt_tokens"], row["completion_tokens"], row["errors"])
            for row in hours] == [("2024-05-31T10:00:00Z", 2, 11, 7, 1), ("2024-05-31T11:00:00Z", 1, 100, 0, 0),
                                  ("2024-06-02T08:00:00Z", 1, 1000, 1, 0)]
    assert (hours[0]["queue_ms"], hours[0]["upstream_ms"]) == (2.0, 30.0)
    days = store.usage.query(start, end, "day")
    assert [(row["period"], row["key"], row["model"], row["requests"]) for row in days] == [
        ("2024-05-31T00:00:00Z", "key_a", None, 1), ("2024-05-31T00:00:00Z", "key_a", "chat", 3),
        ("2024-06-01T00:00:00Z", "env:team-b", "embed", 1), ("2024-06-02T00:00:00Z", "key_a", "chat", 1)]
    months = store.usage.query(start, end, "month", key="key_a")
    assert [(row["period"], row["model"], row["prompt_tokens"]) for row in months] == [
        ("2024-05-01T00:00:00Z", None, 7), ("2024-05-01T00:00:00Z", "chat", 111),
        ("2024-06-01T00:00:00Z", "chat", 1000)]
    # The hour holding start counts; the hour starting at end does not.
    assert [row["period"] for row in store.usage.query(at("2024-05-31T10:30:00"), at("2024-05-31T11:00:00"))] == [
        "2024-05-31T10:00:00Z"]


def test_one_budget_counted_once_by_two_gateways(database_url, open_stores):
    one, other = open_stores(database_url), open_stores(database_url)
    key, _ = one.keys.create("team-a", budget_tokens=1000, budget_per="day")
    one.usage.record(key.id, "chat", 10, 5, False, None, None)
    other.usage.record(key.id, "chat", 20, 0, False, None, None)
    assert one.usage.spent(key.id, "day") == (15, 1)  # its own, before anything is written
    one.usage.flush()
    assert one.usage.spent(key.id, "day") == (15, 1)  # written, not read back yet: still counted
    one.sync()
    assert one.usage.spent(key.id, "day") == (15, 1)  # written, read back: counted once
    for _ in range(2):  # both written and read back, in either order: never counted twice
        for store in (other, one):
            store.sync()
            assert store.usage.spent(key.id, "day") == (35, 2)
            assert store.usage.spent(key.id, "month") == (35, 2)
    tomorrow = period_end("day", one.clock())
    assert one.usage.spent(key.id, "day", now=tomorrow) == (0, 0)


def test_written_by_the_thread_and_at_close(database_url, open_stores):
    store = open_stores(database_url)
    store.usage.record("key_a", "chat", 1, 1, False, None, None)
    wait_until(lambda: store.usage.pending == 0, timeout=5)
    store.usage.record("key_a", "chat", 1, 1, False, None, None)
    store.close()
    store.close()
    reopened = open_stores(database_url)
    rows = reopened.usage.query(0, reopened.clock() + 3600)
    assert [row["requests"] for row in rows] == [2]


def test_pending_is_bounded_and_drops_are_counted(tmp_path, open_stores, monkeypatch):
    monkeypatch.setattr(usage_module, "MAX_PENDING", 3)
    store = open_stores(f"sqlite:///{tmp_path / 'gateway.db'}")
    with store._one_round:  # nothing written meanwhile
        for model in ("a", "b", "c", "d", "e"):
            store.usage.record("key_a", model, 1, 1, False, None, None)
        store.usage.record("key_a", "a", 1, 1, False, None, None)  # a row it holds keeps counting
    assert (store.usage.pending, store.usage.dropped) == (3, 2)
    store.sync()
    assert sorted((row["model"], row["requests"]) for row in store.usage.query(0, store.clock() + 3600)) == [
        ("a", 2), ("b", 1), ("c", 1)]


def test_spent_is_read_before_open_returns(database_url, open_stores):
    one = open_stores(database_url)
    key, _ = one.keys.create("team-a", budget_tokens=1000, budget_per="day")
    one.usage.record(key.id, "chat", 10, 5, False, None, None)
    one.usage.flush()
    other = open_stores(database_url)  # its first round is a second away: the budget counts from the first request
    assert other.usage.spent(key.id, "day") == (15, 1) and other.usage.spent(key.id, "month") == (15, 1)
