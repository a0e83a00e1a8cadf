"""A real PostgreSQL stopped mid-traffic and started again: known keys keep working, usage waits in memory and is
all written when it is back, with one warning each way; nothing reaches the caller as an exception."""
import logging
import threading

import pytest

from service.store import StoreUnavailable, open_store
from tests.pools import wait_until


@pytest.fixture
def traffic():
    """traffic(store, key, secret): a thread looking up and recording until counts["stop"]() (or the test's end);
    returns its counts."""
    threads, stop = [], threading.Event()

    def start(store, key, secret):
        counts = {"requests": 0, "refused": 0, "errors": []}

        def stop_it():
            stop.set()
            threads[-1].join(5)

        def run():
            while not stop.is_set():
                try:
                    if store.keys.lookup(secret) != key:
                        counts["refused"] += 1
                    store.usage.record(key.id, "chat", 2, 3, False, 1.0, 1.0)
                    counts["requests"] += 1
                except Exception as error:  # none may escape to the caller: counted, then asserted empty
                    counts["errors"].append(repr(error))
                stop.wait(0.002)

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()
        counts["stop"] = stop_it
        return counts

    yield start
    stop.set()
    for thread in threads:
        thread.join(5)


def test_postgresql_stopped_and_started_mid_traffic(postgres_server, postgres_url, traffic, caplog):
    caplog.set_level(logging.WARNING, logger="service.store")
    store = open_store(postgres_url)
    try:
        key, secret = store.keys.create("team-a", budget_tokens=10**9, budget_per="day")
        counts = traffic(store, key, secret)
        wait_until(lambda: counts["requests"] > 20, timeout=5)

        postgres_server.stop()
        wait_until(lambda: not store.healthy, timeout=5)
        before = counts["requests"]
        wait_until(lambda: counts["requests"] > before + 50, timeout=5)
        assert store.keys.lookup(secret) == key
        assert store.keys.lookup("sk-gw-" + "u" * 40) is None  # DATABASE_FAILURE=open: unknown keys are unknown
        assert store.usage.pending > 0
        with pytest.raises(StoreUnavailable):
            store.keys.create("team-b")

        postgres_server.start()
        wait_until(lambda: store.healthy, timeout=10)
        counts["stop"]()
        wait_until(lambda: store.usage.pending == 0, timeout=5)  # written by the store's thread, not by close()
        written = sum(row["requests"] for row in store.usage.query(0, store.clock() + 3600))
    finally:
        store.close()
    reopened = open_store(postgres_url)
    try:
        total = sum(row["requests"] for row in reopened.usage.query(0, reopened.clock() + 3600))
    finally:
        reopened.close()
    assert counts["errors"] == [] and counts["refused"] == 0
    assert total == written == counts["requests"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len([line for line in warnings if line.startswith("database unreachable")]) == 1, warnings
    assert len([line for line in warnings if line.startswith("database reachable again")]) == 1, warnings


def test_closed_mode_refuses_keys_it_cannot_check(postgres_server, postgres_url):
    store = open_store(postgres_url, failure="closed")
    try:
        key, secret = store.keys.create("team-a")
        postgres_server.stop()
        wait_until(lambda: not store.healthy, timeout=5)
        assert store.keys.lookup(secret) == key  # known: checked from the cache
        with pytest.raises(StoreUnavailable) as unavailable:
            store.keys.lookup("sk-gw-" + "u" * 40)
        assert (unavailable.value.status, unavailable.value.code) == (503, "database_unavailable")
        with pytest.raises(StoreUnavailable):
            store.usage.query(0, 1)
    finally:
        postgres_server.start()
        store.close()
