"""bin/keys: keys and usage from a shell, on the gateway's database with the gateway stopped; its exit codes."""
import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
from alembic.script import ScriptDirectory

from service.config import load_settings
from service.store import open_store
from service.store.engine import MIGRATIONS
from service.store.cli import default_database_url, main
from tests.apps import TEAM_ID, TEAM_KEY
from tests.processes import ROOT


@pytest.fixture
def keys(tmp_path, monkeypatch, capsys):
    """run(*args): bin/keys's main on a database in tmp_path, with one OPENAI_API_KEYS client; returns
    (exit code, stdout, stderr)."""
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEYS", f"{TEAM_KEY}:{TEAM_ID}")

    def run(*args):
        try:
            code = main(list(args))
        except SystemExit as stop:  # argparse's refusals
            code = stop.code
        out = capsys.readouterr()
        return code, out.out, out.err

    run.url = url
    return run


def test_create_list_show_update_rotate_revoke(keys):
    code, out, _ = keys("create", "team-a", "--models", "chat,embed", "--tpm", "100000", "--budget-month", "5000000",
                        "--expires", "2999-01-01")
    assert code == 0
    secret = next(line.split()[1] for line in out.splitlines() if line.startswith("secret: "))
    assert secret.startswith("sk-gw-") and "team-a" in out and "chat,embed" in out and "5000000 tokens per month" in out

    code, out, _ = keys("list")
    assert code == 0 and secret not in out
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:3] == ["ID", "NAME", "PREFIX"]
    assert rows[1][1:3] == ["team-a", secret[:8]] and rows[1][-2:] == ["active", "database"]
    assert rows[2][:3] == [f"env:{TEAM_ID}", TEAM_ID, "-"] and rows[2][-1] == "environment"

    code, out, _ = keys("update", "team-a", "--tpm", "none", "--rpm", "60", "--models", "all", "--json")
    shown = json.loads(out)
    assert code == 0 and (shown["tpm"], shown["rpm"], shown["models"]) == (None, 60, None)
    assert shown["budget"]["tokens"] == 5000000  # what the options did not name stays

    code, out, _ = keys("rotate", "team-a", "--grace", "120", "--json")
    rotated = json.loads(out)
    assert code == 0 and rotated["key"] != secret and rotated["old_key_valid_until"] > time.time() + 100

    code, out, _ = keys("revoke", shown["id"])
    assert code == 0 and "revoked" in out
    code, out, _ = keys("show", "team-a", "--json")
    assert code == 0 and json.loads(out)["status"] == "revoked" and "key" not in json.loads(out)


def test_usage_as_a_table_and_as_csv(keys):
    store = open_store(keys.url)
    try:
        made, _ = store.keys.create("team-u")
        store.usage.record(made.id, "chat", 10, 5, False, 1.0, 2.0, when=time.time() - 3600)
        store.usage.record(f"env:{TEAM_ID}", "chat", 3, 1, True, 1.0, 2.0, when=time.time() - 3600)
    finally:
        store.close()  # written on close
    code, out, _ = keys("usage", "--key", "team-u", "--group-by", "day")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:4] == ["PERIOD", "KEY", "NAME", "MODEL"] and row.split()[1:5] == [made.id, "team-u",
                                                                                          "chat", "1"]
    code, out, _ = keys("usage", "--csv", "--from", str(int(time.time() - 86400)))
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("period,key,name,model,requests") and len(lines) == 3
    assert keys("usage", "--model", "nothing")[1] == "no usage in this period\n"


@pytest.mark.parametrize("args, code, words", [
    (("show", "nobody"), 1, "no key has the id or name 'nobody'"),
    (("revoke", f"env:{TEAM_ID}"), 1, "change it in the environment"),
    (("create", TEAM_ID), 1, "OPENAI_API_KEYS"),
    (("create", "admin"), 2, "NAME: Is the gateway's own client id"),
    (("create", "a", "--rpm", "lots"), 2, "'lots' is not a whole number"),
    (("create", "a", "--weight", "0"), 2, "--weight: Must be greater than or equal to 1"),
    (("create", "a", "--rpm", "99999999999999999999"), 2, "--rpm: Must be greater than or equal to 0 and less"),
    (("create", "a", "--budget-day", str(2**63)), 2, "--budget-day/--budget-month: Must be greater than or equal"),
    (("create", "a", "--expires", "1e30"), 2, "--expires: Is out of range"),
    (("create", "a", "--budget-day", "5", "--budget-requests-month", "3"), 2, "one period"),
    (("create", "a", "--expires", "someday"), 2, "--expires: 'someday' is neither"),
    (("rotate", "nobody"), 1, "no key"),
    (("usage", "--from", "2025-02-01", "--to", "2025-01-01"), 2, "'from': must be before 'to'"),
    (("frobnicate",), 2, "invalid choice"),
])
def test_refusals_and_their_exit_codes(keys, args, code, words):
    done, out, err = keys(*args)
    assert done == code and words in err and out == ""


def test_a_bad_database_url_is_a_settings_error(keys, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "mysql://somewhere/db")
    code, _, err = keys("list")
    assert code == 2 and err.startswith("error: DATABASE_URL: ")


def test_a_database_newer_than_the_code_is_refused_in_one_line(keys, tmp_path):
    keys("list")  # made and migrated
    connection = sqlite3.connect(tmp_path / "gateway.db")
    with connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    connection.close()
    code, out, err = keys("list")
    assert code == 2 and out == "" and err.splitlines() == [
        "error: database is at schema 9999_from_the_future, this gateway knows up to "
        f"{ScriptDirectory(MIGRATIONS).get_current_head()}: upgrade the gateway"]


def test_the_default_database_is_the_gateways(tmp_path):
    settings = load_settings({"MODELS_DIR": str(tmp_path)})
    assert default_database_url(settings) == f"sqlite:///{tmp_path / 'gateway.db'}"
    assert default_database_url({**settings, "DATABASE_URL": "postgresql://h/db"}) == "postgresql://h/db"


def test_the_script_runs_and_its_help_only_prints(tmp_path):
    env = {**os.environ, "MODELS_DIR": str(tmp_path)}
    env.pop("DATABASE_URL", None)

    def bin_keys(*args):
        return subprocess.run([sys.executable, os.path.join(ROOT, "bin", "keys"), *args], env=env, text=True,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=60)

    helped = bin_keys("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: bin/keys ") and "rotate" in helped.stdout
    assert list(tmp_path.iterdir()) == []  # no database made by a --help
    made = bin_keys("create", "team-s")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "gateway.db").exists() and "secret: sk-gw-" in made.stdout
