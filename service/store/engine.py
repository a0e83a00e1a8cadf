"""The database engine (SQLite or PostgreSQL from one URL) and its schema migrations (Alembic, run in-process)."""
import logging
import os
import sqlite3
import time

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, literal_column, text
from sqlalchemy.engine import make_url

from .errors import StoreError

MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
# How long a connection attempt may take: a request asking about an unknown key waits for it at worst.
CONNECT_TIMEOUT_S = 2
# How long SQLite waits for another writer (another thread, or another gateway on the same file).
SQLITE_BUSY_MS = 5000
WAL_RETRY_S = 0.01
# Two gateways migrating one PostgreSQL database at once take turns on this lock (any constant of ours).
MIGRATION_LOCK = 2300023

# The database's own clock, in epoch seconds, per dialect: rows' updated_at come from one clock for every gateway.
DATABASE_NOW = {
    "postgresql": literal_column("extract(epoch from clock_timestamp())"),
    "sqlite": literal_column("((julianday('now') - 2440587.5) * 86400.0)"),
}


def make_engine(url: str):
    """An engine for sqlite:///PATH (file and folders made if missing; WAL, busy timeout) or postgresql://..."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
        engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True, pool_size=4, max_overflow=8,
                             connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    raise StoreError(f"DATABASE_URL: unsupported database {parsed.get_backend_name()!r} (sqlite or postgresql)")


def _sqlite_pragmas(connection, _record):
    # WAL: readers (the key refresh, admin reads) never wait for the usage writer, nor it for them.
    cursor = connection.cursor()
    # Switching a new file to WAL takes its exclusive lock, and SQLite answers "locked" at once, without waiting
    # its busy timeout, while another gateway opening it too holds a lock: so it is tried again until then.
    deadline = time.monotonic() + SQLITE_BUSY_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(WAL_RETRY_S)
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def database_now(engine):
    """A SQL expression for the database's current time in epoch seconds."""
    return DATABASE_NOW[engine.dialect.name]


def _alembic_config(connection) -> Config:
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    return config


def migrate(engine, revision="head"):
    """Bring the schema up to revision (the newest by default); refuse a database newer than this code."""
    # Alembic tells of each plugin it sets up at INFO: noise in the gateway's log (its upgrades stay at INFO).
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    scripts = ScriptDirectory(MIGRATIONS)
    known = {script.revision for script in scripts.walk_revisions()}
    newest = scripts.get_current_head()
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": MIGRATION_LOCK})
        else:
            # SQLite's write lock before the revision is read: gateways opening a new file together take turns
            # (else two read "no schema" and the second's CREATE TABLE fails); the others wait up to SQLITE_BUSY_MS.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        current = MigrationContext.configure(connection).get_current_revision()
        if current is not None and current not in known:
            raise StoreError(f"database is at schema {current}, this gateway knows up to {newest}: "
                             "upgrade the gateway")
        command.upgrade(_alembic_config(connection), revision)


def schema_revision(engine):
    """The database's schema revision (None when it has none yet)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
