"""A database that refuses writes for a while (a standby, a primary demoted in a failover: read-only) is an outage
for the usage: the rows wait in memory and are written once it takes them again, never dropped."""
import psycopg
import pytest
from sqlalchemy import text

from service.store import open_store


def read_only(store, name, on: bool):
    with store.engine.begin() as connection:
        connection.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}'))
    store.engine.dispose()  # the setting applies to new sessions


def test_a_read_only_database_keeps_the_usage_until_it_takes_writes_again(postgres_url):
    store = open_store(postgres_url)
    name = postgres_url.rsplit("/", 1)[1]
    try:
        read_only(store, name, True)
        store.usage.record("key_a", "chat", 10, 5, False, None, None)
        with pytest.raises(Exception):
            store.sync()
        assert store.usage.dropped == 0 and store.usage.pending == 1
        # Writable again (a session of its own that is not read-only, as an operator's would be).
        with psycopg.connect(postgres_url, autocommit=True, options="-c default_transaction_read_only=off") as admin:
            admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = off')
        store.engine.dispose()
        store.sync()
        rows = store.usage.query(0, 2 ** 40)
        assert [(row["key"], row["requests"], row["prompt_tokens"]) for row in rows] == [("key_a", 1, 10)]
    finally:
        store.close()
