"""The schema, migrated at open on real SQLite and PostgreSQL: from nothing, from the previous revision with its
data kept, and a database newer than the code refused with one line."""
import hashlib
import subprocess
import sys
import time

import pytest
from sqlalchemy import text

from service.llama.supervisor import free_port
from service.store import StoreError, open_store
from service.store.engine import make_engine, migrate, schema_revision
from tests.processes import ROOT

SECRET = "sk-gw-" + "m" * 40


def test_from_an_empty_database(database_url):
    store = open_store(database_url)
    try:
        assert schema_revision(store.engine) == "0002"
        key, secret = store.keys.create("team-a")
        assert store.keys.lookup(secret) == key
    finally:
        store.close()
    again = open_store(database_url)  # already at the newest: nothing to do, nothing lost
    try:
        assert [key.name for key in again.keys.list()] == ["team-a"]
    finally:
        again.close()


def test_from_the_previous_revision(database_url):
    engine = make_engine(database_url)
    migrate(engine, "0001")
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO keys (id, name, digest, prefix, models, rpm, created_at, updated_at) "
            "VALUES ('key_000000000001', 'team-a', :digest, :prefix, '[\"chat\"]', 60, 1.0, 1.0)"),
            {"digest": hashlib.sha256(SECRET.encode()).hexdigest(), "prefix": SECRET[:8]})
        connection.execute(text(
            "INSERT INTO usage VALUES ('key_000000000001', 'chat', 3600, 2, 10, 20, 1, 5.0, 50.0)"))
    engine.dispose()
    store = open_store(database_url)
    try:
        assert schema_revision(store.engine) == "0002"
        key = store.keys.lookup(SECRET)
        assert (key.id, key.name, key.models, key.rpm) == ("key_000000000001", "team-a", ("chat",), 60)
        rotated, secret = store.keys.rotate(key.id, grace_s=60)  # the columns 0002 added
        assert store.keys.lookup(SECRET) == rotated == store.keys.lookup(secret)
        assert [(row["requests"], row["completion_tokens"]) for row in store.usage.query(0, 7200)] == [(2, 20)]
    finally:
        store.close()


def test_a_newer_database_is_refused(database_url):
    open_store(database_url).close()
    engine = make_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    with pytest.raises(StoreError) as refused:
        open_store(database_url)
    assert str(refused.value) == "database is at schema 0099, this gateway knows up to 0002: upgrade the gateway"


def test_unreachable_or_unknown_databases_are_one_line():
    with pytest.raises(StoreError) as unreachable:
        open_store(f"postgresql://gateway:hunter2@127.0.0.1:{free_port()}/gateway")
    message = str(unreachable.value)
    assert message.startswith("database unreachable at start") and "\n" not in message and "hunter2" not in message
    with pytest.raises(StoreError, match="unsupported database 'mysql'"):
        open_store("mysql://localhost/gateway")


# One gateway of several starting together: once imported, it says so and waits for the time to start at; then it
# opens a new file every STEP_S (the others open the same file at the same moments) and prints each failure.
STARTING_GATEWAY = """
import sys, time
from service.store import open_store
print("ready", flush=True)
start = float(sys.stdin.readline())
for index, path in enumerate(sys.argv[2:]):
    time.sleep(max(0.0, start + index * float(sys.argv[1]) - time.time()))
    try:
        open_store("sqlite:///" + path).close()
    except Exception as error:
        print(f"{index}: {error!r}"[:300], flush=True)
"""
GATEWAYS, FILES, STEP_S = 3, 8, 0.2


def test_gateways_starting_together_on_a_new_sqlite_file(tmp_path):
    paths = [(tmp_path / f"gateway-{number}.db").as_posix() for number in range(FILES)]
    gateways = [subprocess.Popen([sys.executable, "-c", STARTING_GATEWAY, str(STEP_S), *paths], cwd=ROOT, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for _ in range(GATEWAYS)]
    try:
        assert [gateway.stdout.readline() for gateway in gateways] == ["ready\n"] * GATEWAYS
        start = time.time() + 0.2
        for gateway in gateways:
            gateway.stdin.write(f"{start}\n")
            gateway.stdin.flush()
        failures = [gateway.communicate(timeout=60)[0] for gateway in gateways]
    finally:
        for gateway in gateways:
            gateway.kill()
    assert "".join(failures) == ""
    for path in paths:
        engine = make_engine(f"sqlite:///{path}")
        assert schema_revision(engine) == "0002"
        engine.dispose()
