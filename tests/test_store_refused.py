"""What the database refuses is not an outage: a client's long model name is cut to the column, a row the database
still refuses is dropped (counted, logged without the client's text) and the others written, the keys keep
refreshing, and out-of-range limits never reach the database (real SQLite and PostgreSQL)."""
import logging

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DataError

from service.store.health import is_outage

CLIENT_MODEL = "m-from-a-client-" + "x" * 1264  # 1280 characters: what a request may name, the column holds 200


def written(store) -> list:
    """(key, model, requests) of every usage row, as the database and memory have them."""
    return sorted((row["key"], row["model"], row["requests"]) for row in store.usage.query(0, store.clock() + 3600))


def test_long_key_and_model_names_are_cut_to_the_columns(database_url, open_stores):
    store = open_stores(database_url)
    store.usage.record("k" * 300, CLIENT_MODEL, 1, 1, False, None, None)
    store.usage.record("key_a", "chat", 1, 1, False, None, None)
    store.sync()
    assert store.healthy and (store.usage.pending, store.usage.dropped) == (0, 0)
    assert written(store) == [("key_a", "chat", 1), ("k" * 200, CLIENT_MODEL[:200], 1)]


def test_a_row_the_database_refuses_is_dropped_and_the_others_written(database_url, open_stores, caplog):
    caplog.set_level(logging.INFO, logger="service.store")
    store = open_stores(database_url)
    store.usage.record("key_a", "chat", 1, 1, False, None, None)
    store.usage.record("key_b", "secret-looking-model", 2**64, 0, False, None, None)  # past BIGINT
    store.usage.record("key_c", "embed", 1, 0, False, None, None)
    store.sync()
    assert store.healthy and (store.usage.pending, store.usage.dropped) == (0, 1)
    assert written(store) == [("key_a", "chat", 1), ("key_c", "embed", 1)]
    assert "secret-looking-model" not in caplog.text
    assert any("model of 20 characters" in record.getMessage() for record in caplog.records), caplog.text
    store.usage.record("key_a", "chat", 1, 1, False, None, None)  # the next round writes as usual
    store.sync()
    assert written(store)[0] == ("key_a", "chat", 2)


def test_keys_are_refreshed_even_when_the_usage_write_fails(database_url, open_stores, monkeypatch):
    one, other = open_stores(database_url), open_stores(database_url)

    def refused():
        raise DataError("INSERT ...", {}, Exception("refused"))

    monkeypatch.setattr(one.usage, "flush", refused)  # its own thread's rounds fail so too from now on
    key, _ = other.keys.create("team-a")  # not looked up by its secret: only a refresh brings it
    with pytest.raises(DataError):
        one.sync()
    assert [cached.id for cached in one.keys.cached()] == [key.id]


def test_only_failures_to_reach_the_database_are_outages(postgres_url, open_stores):
    store = open_stores(postgres_url)
    with pytest.raises(DataError) as refused, store.engine.begin() as connection:
        connection.execute(text("INSERT INTO usage VALUES (:key, 'chat', 0, 1, 1, 1, 0, 0.0, 0.0)"), {"key": "k" * 300})
    assert not is_outage(refused.value)


@pytest.mark.parametrize("field, value", [("rpm", 2**31), ("tpm", 10**20), ("concurrent", -1), ("weight", 2**31),
                                          ("budget_tokens", 2**63), ("budget_requests", 2**63)])
def test_out_of_range_limits_never_reach_the_database(tmp_path, open_stores, field, value):
    store = open_stores(f"sqlite:///{tmp_path / 'gateway.db'}")
    with pytest.raises(ValueError, match=field):
        store.keys.create("team-a", **{field: value, "budget_per": "day"})
    key, _ = store.keys.create("team-a", rpm=2**31 - 1, budget_tokens=2**63 - 1, budget_per="day")
    with pytest.raises(ValueError, match=field):
        store.keys.update(key.id, **{field: value})
    assert store.keys.get(key.id) == key and store.healthy
