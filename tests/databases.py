"""Real databases for the tests: Debian's PostgreSQL started in a temporary folder (as redis_server starts Redis),
and a fixture that runs a test once on SQLite and once on PostgreSQL. conftest.py shares these fixtures."""
import time

import pytest


def _postgres_binary(name):
    """Debian's PostgreSQL program name (on PATH, or under /usr/lib/postgresql/VERSION/bin), or None."""
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda path: int(path.split("/")[4]))
    return candidates[-1] if candidates else None


def _as_postgres_user(user):
    """preexec_fn for PostgreSQL's programs: they refuse to run as root, so a test run as root runs them as user."""
    import os

    if os.name != "posix" or os.geteuid() != 0:
        return None
    import pwd

    entry = pwd.getpwnam(user)

    def switch():
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)

    return switch


class PostgresServer:
    """A real PostgreSQL in a temporary directory (trust auth, its socket there too) on a free loopback port;
    stop() (a fast shutdown, as `pg_ctl stop` does) and start() keep its port and data."""

    def __init__(self, postgres, directory, port, preexec):
        import os

        self.postgres, self.directory, self.port, self.preexec = postgres, directory, port, preexec
        self.data = os.path.join(directory, "data")
        self.process = None
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def start(self):
        """Start the postmaster; return once it takes connections."""
        import subprocess

        import psycopg

        self.process = subprocess.Popen(
            [self.postgres, "-D", self.data, "-p", str(self.port), "-k", self.directory, "-c",
             "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off", "-c",
             "synchronous_commit=off"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=self.preexec, cwd=self.directory)
        deadline = time.monotonic() + 20
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                assert time.monotonic() < deadline and self.process.poll() is None, "postgres did not start"
                time.sleep(0.05)

    @property
    def running(self) -> bool:
        """Whether its postmaster is up."""
        return self.process is not None and self.process.poll() is None

    def stop(self):
        """Stop it as `pg_ctl stop` does by default (fast): connections cut, data kept."""
        import signal

        # SIGINT is PostgreSQL's fast shutdown, what pg_ctl stop sends by default.
        self.process.send_signal(signal.SIGINT)
        self.process.wait(20)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL (Debian's postgresql; .ci/run installs it), one per session. Outside CI, a machine without
    it skips these tests, saying so; with GATEWAY_REQUIRE_POSTGRES=1 (as .ci/run sets) its absence is a failure."""
    import os
    import shutil
    import subprocess
    import tempfile

    from service.llama.supervisor import free_port

    initdb, postgres = _postgres_binary("initdb"), _postgres_binary("postgres")
    if initdb is None or postgres is None:
        if os.environ.get("GATEWAY_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is not installed, and GATEWAY_REQUIRE_POSTGRES=1 says these tests must run")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql): PostgreSQL store tests not run")
    # Not under pytest's tmp_path: its folders are root's alone, and PostgreSQL runs as another user here.
    directory = tempfile.mkdtemp(prefix="gateway-postgres-")
    preexec = _as_postgres_user("nobody")
    if preexec is not None:
        import pwd

        entry = pwd.getpwnam("nobody")
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    subprocess.run([initdb, "-D", os.path.join(directory, "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   preexec_fn=preexec, cwd=directory)
    server = PostgresServer(postgres, directory, free_port(), preexec).start()
    yield server
    if server.running:
        server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's PostgreSQL (started again if a test stopped it); dropped after."""
    import uuid

    import psycopg

    if not postgres_server.running:
        postgres_server.start()
    name = "test_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server.url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    yield postgres_server.url.rsplit("/", 1)[0] + "/" + name
    if not postgres_server.running:
        postgres_server.start()
    with psycopg.connect(postgres_server.url, autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A fresh database URL, once for SQLite (a file in tmp_path) and once for PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def open_stores():
    """open_stores(url, **options): a Store, closed after the test."""
    from service.store import open_store

    stores = []

    def open_one(url, **options):
        stores.append(open_store(url, **options))
        return stores[-1]

    yield open_one
    for store in stores:
        store.close()
