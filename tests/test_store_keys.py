"""The key store on real SQLite and PostgreSQL: create, look up, rotate, revoke; secrets kept as digests only;
the hot path in memory; a change on one gateway seen by another sharing the database."""
import hashlib
import logging
import sqlite3
import threading

import pytest
from sqlalchemy import event, select, text

from service.store import KeyNameTaken, KeyNotFound, open_store
from service.store import key_cache, schema
from tests.pools import wait_until


def statements(store) -> list:
    """Every SQL statement the store's engine sends from now on."""
    sent = []
    event.listen(store.engine, "before_cursor_execute", lambda *args: sent.append(args[2]))
    return sent


def test_create_lookup_rotate_revoke(database_url, open_stores, caplog):
    caplog.set_level(logging.DEBUG)
    store = open_stores(database_url)
    key, secret = store.keys.create("team-a", models=["chat"], rpm=60, budget_tokens=1000, budget_per="month")
    assert key.id.startswith("key_") and len(key.id) == 16 and secret.startswith("sk-gw-") and len(secret) == 46
    assert key.prefix == secret[:8] and key.models == ("chat",) and key.rpm == 60 and key.usable(key.created_at)
    assert store.keys.lookup(secret) == key and store.keys.get(key.id) == key and store.keys.list() == [key]
    assert store.keys.lookup(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None

    updated = store.keys.update(key.id, tpm=500, models=None, weight=3)
    assert (updated.tpm, updated.models, updated.weight, updated.rpm) == (500, None, 3, 60)
    assert store.keys.lookup(secret) == updated

    rotated, new_secret = store.keys.rotate(key.id, grace_s=60)
    assert rotated.prefix == new_secret[:8] and new_secret != secret
    assert store.keys.lookup(new_secret) == rotated and store.keys.lookup(secret) == rotated  # within its grace
    rotated_again, newest = store.keys.rotate(key.id, grace_s=0)
    assert store.keys.lookup(newest) == rotated_again
    assert store.keys.lookup(new_secret) is None and store.keys.lookup(secret) is None

    revoked = store.keys.revoke(key.id)
    assert revoked.revoked_at is not None and not revoked.usable(revoked.revoked_at + 1)
    assert store.keys.lookup(newest) == revoked  # found, so that the caller can say why it refuses
    assert store.keys.revoke(key.id).revoked_at == revoked.revoked_at

    with store.engine.connect() as connection:
        stored = " ".join(str(value) for row in connection.execute(select(schema.keys)) for value in row)
    for shown in (secret, new_secret, newest):
        assert shown not in stored and shown not in caplog.text
    assert hashlib.sha256(newest.encode()).hexdigest() in stored


def test_errors(database_url, open_stores):
    store = open_stores(database_url)
    key, _ = store.keys.create("team-a")
    with pytest.raises(KeyNameTaken) as taken:
        store.keys.create("team-a")
    assert (taken.value.status, taken.value.code) == (409, "key_exists")
    store.keys.create("team-b")
    with pytest.raises(KeyNameTaken):
        store.keys.update(key.id, name="team-b")
    for call in (lambda: store.keys.update("key_nope", rpm=1), lambda: store.keys.revoke("key_nope"),
                 lambda: store.keys.rotate("key_nope", 0)):
        with pytest.raises(KeyNotFound) as missing:
            call()
        assert (missing.value.status, missing.value.code) == (404, "key_not_found")
    assert store.keys.get("key_nope") is None
    with pytest.raises(TypeError):
        store.keys.update(key.id, prefix="sk-gw-xx")
    with pytest.raises(ValueError):
        store.keys.create("team-c", budget_per="week")


def test_old_secret_works_until_its_grace_ends(tmp_path, open_stores):
    now = [1_700_000_000.0]
    store = open_stores(f"sqlite:///{tmp_path / 'gateway.db'}", clock=lambda: now[0])
    key, secret = store.keys.create("team-a", expires_at=now[0] + 3600)
    rotated, new_secret = store.keys.rotate(key.id, grace_s=30)
    now[0] += 29
    assert store.keys.lookup(secret) == rotated
    now[0] += 1
    assert store.keys.lookup(secret) is None and store.keys.lookup(new_secret) == rotated
    assert rotated.usable(now[0]) and not rotated.usable(now[0] + 3600)


def test_hot_path_stays_in_memory(tmp_path, open_stores):
    store = open_stores(f"sqlite:///{tmp_path / 'gateway.db'}")
    key, secret = store.keys.create("team-a")
    sent = statements(store)
    with store._one_round:  # the store's own thread holds off meanwhile
        for _ in range(100):
            assert store.keys.lookup(secret) == key
            store.usage.record(key.id, "chat", 3, 4, False, 1.0, 2.0)
        assert sent == []
        for _ in range(3):
            assert store.keys.lookup("sk-gw-" + "x" * 40) is None  # asked once, then remembered
            assert store.keys.lookup("not-a-gateway-key") is None   # never asked
        assert len(sent) == 1


def test_a_key_made_elsewhere_works_at_once(database_url, open_stores):
    one, other = open_stores(database_url), open_stores(database_url)
    key, secret = one.keys.create("team-a")
    assert other.keys.lookup(secret) == key


def test_a_revoke_elsewhere_is_seen_within_seconds(database_url, open_stores):
    one, other = open_stores(database_url), open_stores(database_url)
    changes = []
    other.keys.on_change(changes.extend)
    key, secret = one.keys.create("team-a")
    assert other.keys.lookup(secret) == key and changes == [key]
    one.keys.revoke(key.id)
    wait_until(lambda: other.keys.lookup(secret).revoked_at is not None, timeout=3)
    assert changes[-1].revoked_at is not None


def test_refresh_reads_only_changed_rows(tmp_path, open_stores, monkeypatch):
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    writer = open_stores(url)
    made = [writer.keys.create(f"team-{number}")[0] for number in range(30)]
    with writer.engine.begin() as connection:  # as if made a while ago
        connection.execute(text("UPDATE keys SET updated_at = updated_at - 100"))
    reader = open_stores(url)
    writer.keys.update(made[0].id, rpm=7)
    read = []
    original = key_cache.key_from_row
    monkeypatch.setattr(key_cache, "key_from_row", lambda row: read.append(row.id) or original(row))
    with reader._one_round, reader.engine.connect() as connection:
        reader.keys.cache.refresh(connection)  # from the initial load's newest change on
        read.clear()
        reader.keys.cache.refresh(connection)
    assert read == [made[0].id]
    assert len(reader.keys.cached()) == 30


def test_sqlite_file_made_with_wal_and_many_threads(tmp_path, open_stores):
    path = tmp_path / "deep" / "er" / "gateway.db"
    store = open_stores(f"sqlite:///{path}")
    assert path.exists()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    failures = []

    def work(number):
        try:
            for round in range(5):
                key, secret = store.keys.create(f"team-{number}-{round}")
                assert store.keys.lookup(secret) == key
                store.usage.record(key.id, "chat", 1, 1, False, None, None)
                store.keys.update(key.id, rpm=round + 1)
        except Exception as error:  # reported below, with the thread's number
            failures.append((number, repr(error)))

    threads = [threading.Thread(target=work, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == []
    assert len(store.keys.list()) == 40


def test_a_row_read_before_a_change_here_never_undoes_it(database_url, open_stores):
    store = open_stores(database_url)
    key, secret = store.keys.create("team-a")
    with store.engine.begin() as connection:  # a refresh's read, just before the revoke commits
        connection.execute(text("UPDATE keys SET updated_at = updated_at - 1"))  # (a clock's tick before it)
        read_before = connection.execute(select(schema.keys).where(schema.keys.c.id == key.id)).all()
    revoked = store.keys.revoke(key.id)
    assert store.keys.cache.apply(read_before) == []  # then applied: older than the cached row, ignored
    assert store.keys.lookup(secret) == revoked and store.keys.cached() == [revoked]


def test_a_revoke_reaches_the_cache_after_the_database_clock_stepped_back(database_url):
    from sqlalchemy import text

    store = open_store(database_url)
    try:
        key, secret = store.keys.create("team-clock")
        with store.engine.begin() as connection:  # its last change stamped 60 s ahead of the clock now
            connection.execute(text("UPDATE keys SET updated_at = updated_at + 60"))
        store.keys.cache._since = None  # a full reload: the cache holds that stamp
        store.sync()
        store.keys.revoke(key.id)
        store.sync()
        assert store.keys.lookup(secret).revoked_at is not None
    finally:
        store.close()
