"""The key admin API (/admin/keys) and the usage route (/admin/usage) on a real database: SQLite in a temporary
folder, and PostgreSQL once; for ADMIN_API_KEY alone; no secret ever shown again."""
import json
import time

import pytest

from service.api import admin_keys, admin_usage
from service.families import OPENAI
from service.policy import hooks
from tests.apps import TEAM_ID, TEAM_KEY, routed_app
from tests.clients import assert_openai_envelope

ADMIN_KEY = "sk-admin-keys-test-9876"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SETTINGS = {"ADMIN_API_KEY": ADMIN_KEY, "OPENAI_API_KEYS": f"{TEAM_KEY}:{TEAM_ID}", "RATE_LIMITS": f"{TEAM_ID}:rpm=7"}
UNUSED_URL = "http://127.0.0.1:9"  # never called: these routes talk to the database only
ADMIN_PATHS = ("/admin/keys", "/admin/keys/<key_id>", "/admin/keys/<key_id>/rotate", "/admin/usage")
DAY = 86400


@pytest.fixture
def admin(make_app, tmp_path, monkeypatch):
    """build(url or None): a test client of a keyed gateway whose store is at url (None: no database); the
    store is client.application.extensions["store"]."""
    opened = []
    # Until policy/hooks.py makes every /admin/... rule an admin rule (harmless after).
    monkeypatch.setattr(hooks, "ADMIN_RULES", tuple(getattr(hooks, "ADMIN_RULES", ())) + ADMIN_PATHS, raising=False)

    def build(url="sqlite"):
        if url == "sqlite":
            url = f"sqlite:///{tmp_path / 'gateway.db'}"
        app = routed_app(make_app, {"chat": [UNUSED_URL]}, DATABASE_URL=url, **SETTINGS)
        if url is not None and app.extensions.get("store") is None:  # until the factory opens it
            from service.store import open_store

            app.extensions["store"] = open_store(url)
            opened.append(app.extensions["store"])
        app.extensions.setdefault("store", None)
        for blueprint in (admin_keys.bp, admin_usage.bp):  # until api/__init__.py lists them
            if blueprint.name not in app.blueprints:
                app.register_blueprint(blueprint)
                app.extensions["families"][blueprint.name] = OPENAI
        return app.test_client()

    yield build
    for store in opened:
        store.close()


def create(client, **fields):
    """POST /admin/keys; the 201's body."""
    response = client.post("/admin/keys", json=fields, headers=ADMIN)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_create_list_update_rotate_revoke(admin):
    client = admin()
    store = client.application.extensions["store"]
    made = create(client, name="team-a", models=["chat"], rpm=600, tpm=100000,
                  budget={"tokens": 5000000, "per": "month"}, expires_at="2999-01-01T00:00:00Z")
    secret = made["key"]
    assert secret.startswith("sk-gw-") and made["prefix"] == secret[:8] and made["id"].startswith("key_")
    assert made["expires_at"] == 32472144000 and made["status"] == "active" and made["read_only"] is False
    assert made["budget"]["tokens"] == 5000000 and made["budget"]["spent_tokens"] == 0
    assert store.keys.lookup(secret).name == "team-a"

    listed = client.get("/admin/keys", headers=ADMIN).get_json()
    assert secret not in json.dumps(listed) and "key" not in listed["data"][0]
    assert [(key["name"], key["source"], key["read_only"]) for key in listed["data"]] == [
        ("team-a", "database", False), (TEAM_ID, "environment", True)]
    environment = listed["data"][1]
    assert environment["id"] == f"env:{TEAM_ID}" and environment["prefix"] is None and environment["rpm"] == 7
    assert client.get(f"/admin/keys/env:{TEAM_ID}", headers=ADMIN).get_json() == environment

    changed = client.patch(f"/admin/keys/{made['id']}", json={"rpm": None, "weight": 3, "models": None,
                                                              "budget": None, "expires_at": None}, headers=ADMIN)
    assert changed.status_code == 200
    changed = changed.get_json()
    assert (changed["rpm"], changed["tpm"], changed["weight"], changed["models"], changed["budget"],
            changed["expires_at"]) == (None, 100000, 3, None, None, None)
    assert client.get(f"/admin/keys/{made['id']}", headers=ADMIN).get_json() == changed

    rotated = client.post(f"/admin/keys/{made['id']}/rotate", json={"grace_s": 60}, headers=ADMIN).get_json()
    assert rotated["key"] != secret and rotated["prefix"] == rotated["key"][:8]
    assert time.time() + 50 < rotated["old_key_valid_until"] <= time.time() + 60
    assert store.keys.lookup(rotated["key"]).id == made["id"] and store.keys.lookup(secret) is not None
    no_grace = client.post(f"/admin/keys/{made['id']}/rotate", json={"grace_s": 0}, headers=ADMIN).get_json()
    assert store.keys.lookup(rotated["key"]) is None and store.keys.lookup(no_grace["key"]) is not None

    revoked = client.delete(f"/admin/keys/{made['id']}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.get_json()["status"] == "revoked"
    assert not store.keys.lookup(no_grace["key"]).usable(time.time())
    assert client.get(f"/admin/keys/{made['id']}", headers=ADMIN).get_json()["revoked_at"] is not None


def test_rotate_without_a_body_keeps_the_old_secret_an_hour(admin):
    client = admin()
    made = create(client, name="team-b")
    rotated = client.post(f"/admin/keys/{made['id']}/rotate", headers=ADMIN)
    assert rotated.status_code == 200
    assert rotated.get_json()["old_key_valid_until"] == pytest.approx(time.time() + 3600, abs=30)


@pytest.mark.parametrize("body, param", [
    ({}, "name"),
    ({"name": "bad name!"}, "name"),
    ({"name": "x" * 65}, "name"),
    ({"name": "admin"}, "name"),
    ({"name": "a", "rpm": "10"}, "rpm"),
    ({"name": "a", "tpm": -1}, "tpm"),
    ({"name": "a", "weight": 0}, "weight"),
    ({"name": "a", "models": []}, "models"),
    ({"name": "a", "tmp": 5}, "tmp"),  # a typo of tpm is refused, not ignored
    ({"name": "a", "budget": {"tokens": 5}}, "budget.per"),
    ({"name": "a", "budget": {"tokens": 5, "per": "week"}}, "budget.per"),
    ({"name": "a", "budget": {"per": "day"}}, "budget.tokens"),
    ({"name": "a", "expires_at": "tomorrow"}, "expires_at"),
    ({"name": "a", "expires_at": 1000}, "expires_at"),  # in the past
    ({"name": "a", "expires_at": True}, "expires_at"),
    ({"name": "a", "expires_at": 1e30}, "expires_at"),  # past 9999-12-31: no time a key can be shown to end at
    ({"name": "a", "rpm": 99999999999999999999}, "rpm"),  # larger than the database's columns hold
    ({"name": "a", "tpm": 2**31}, "tpm"),
    ({"name": "a", "concurrent": 2**31}, "concurrent"),
    ({"name": "a", "weight": 2**31}, "weight"),
    ({"name": "a", "budget": {"tokens": 2**63, "per": "day"}}, "budget.tokens"),
    ({"name": "a", "budget": {"requests": 10**23, "per": "day"}}, "budget.requests"),
])
def test_a_bad_field_is_a_400_naming_it(admin, body, param):
    error = assert_openai_envelope(admin().post("/admin/keys", json=body, headers=ADMIN), 400)
    assert error["param"] == param, error


def test_the_largest_numbers_the_database_holds_on_postgresql(postgres_url, admin):
    client = admin(postgres_url)
    made = create(client, name="team-a", rpm=2**31 - 1, weight=2**31 - 1, budget={"tokens": 2**63 - 1, "per": "day"})
    assert (made["rpm"], made["weight"], made["budget"]["tokens"]) == (2**31 - 1, 2**31 - 1, 2**63 - 1)
    for body, param in (({"rpm": 99999999999999999999}, "rpm"), ({"budget": {"requests": 2**63, "per": "day"}},
                                                                  "budget.requests")):
        error = assert_openai_envelope(client.patch(f"/admin/keys/{made['id']}", json=body, headers=ADMIN), 400)
        assert error["param"] == param, error
    assert client.application.extensions["store"].healthy
    assert client.get(f"/admin/keys/{made['id']}", headers=ADMIN).get_json()["rpm"] == 2**31 - 1


def test_names_the_environment_or_another_key_has_are_409(admin):
    client = admin()
    made = create(client, name="team-c")
    for name in (TEAM_ID, "team-c"):
        error = assert_openai_envelope(client.post("/admin/keys", json={"name": name}, headers=ADMIN), 409)
        assert error["code"] == "key_exists" and error["param"] == "name"
    error = assert_openai_envelope(client.patch(f"/admin/keys/{made['id']}", json={"name": TEAM_ID},
                                                headers=ADMIN), 409)
    assert error["code"] == "key_exists" and error["param"] == "name"


def test_unknown_and_read_only_keys(admin):
    client = admin()
    for method, path in (("get", ""), ("patch", ""), ("post", "/rotate"), ("delete", "")):
        response = getattr(client, method)(f"/admin/keys/key_000000000000{path}", json={}, headers=ADMIN)
        assert assert_openai_envelope(response, 404)["code"] == "key_not_found"
        response = getattr(client, method)(f"/admin/keys/env:{TEAM_ID}{path}", json={}, headers=ADMIN)
        if method != "get":
            assert assert_openai_envelope(response, 409)["code"] == "key_read_only"


def test_only_the_admin_key_reaches_them(admin):
    client = admin()
    for path in ("/admin/keys", "/admin/usage"):
        assert assert_openai_envelope(client.get(path), 401)["code"] == "invalid_api_key"
        refused = client.get(path, headers={"Authorization": f"Bearer {TEAM_KEY}"})
        assert assert_openai_envelope(refused, 403)["code"] == "admin_key_required"


def test_without_a_database_they_say_so(admin):
    client = admin(url=None)
    for path in ("/admin/keys", "/admin/usage"):
        error = assert_openai_envelope(client.get(path, headers=ADMIN), 404)
        assert error["code"] == "store_off" and "DATABASE_URL" in error["message"]
    error = assert_openai_envelope(client.post("/admin/keys", json={"name": "a"}, headers=ADMIN), 404)
    assert error["code"] == "store_off"


def _flushed_usage(client, now):
    """Usage of team-u and the environment's team on 'chat' and 'embed', yesterday and two days ago."""
    store = client.application.extensions["store"]
    made = create(client, name="team-u")
    store.usage.record(made["id"], "chat", 10, 5, False, 1.0, 2.0, when=now - 3600)
    store.usage.record(made["id"], "chat", 20, 5, True, 1.0, 2.0, when=now - 3 * 3600)
    store.usage.record(made["id"], "embed", 7, 0, False, None, 1.0, when=now - 3600)
    store.usage.record(f"env:{TEAM_ID}", "chat", 100, 50, False, 0.0, 9.0, when=now - 2 * DAY - 60)
    return made


def test_usage_per_key_model_and_period(admin):
    client = admin()
    now = time.time()
    made = _flushed_usage(client, now)
    recent = client.get("/admin/usage?group_by=month", headers=ADMIN).get_json()  # the last 24 h by default
    assert recent["object"] == "list" and recent["group_by"] == "month"
    rows = {}
    for row in recent["data"]:  # the 24 h may span two months
        total = rows.setdefault((row["key"], row["name"], row["model"]),
                                {"requests": 0, "prompt_tokens": 0, "errors": 0})
        for name in total:
            total[name] += row[name]
    assert rows == {(made["id"], "team-u", "chat"): {"requests": 2, "prompt_tokens": 30, "errors": 1},
                    (made["id"], "team-u", "embed"): {"requests": 1, "prompt_tokens": 7, "errors": 0}}

    three_days = {"from": str(int(now - 3 * DAY)), "to": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 60))}
    team = client.get("/admin/usage", query_string={**three_days, "key": TEAM_ID}, headers=ADMIN).get_json()
    assert [(row["key"], row["name"], row["prompt_tokens"]) for row in team["data"]] == [
        (f"env:{TEAM_ID}", TEAM_ID, 100)]
    chat = client.get("/admin/usage", query_string={**three_days, "model": "chat", "key": "team-u"},
                      headers=ADMIN).get_json()
    assert sorted(row["prompt_tokens"] for row in chat["data"]) == [10, 20]  # per hour, the default

    as_csv = client.get("/admin/usage", query_string={**three_days, "format": "csv"}, headers=ADMIN)
    assert as_csv.mimetype == "text/csv"
    lines = as_csv.get_data(as_text=True).splitlines()
    assert lines[0] == "period,key,name,model,requests,prompt_tokens,completion_tokens,errors,queue_ms,upstream_ms"
    assert len(lines) == 1 + 4
    accepted = client.get("/admin/usage", headers={**ADMIN, "Accept": "text/csv"})
    assert accepted.mimetype == "text/csv" and len(accepted.get_data(as_text=True).splitlines()) == 1 + 3


@pytest.mark.parametrize("query, param", [
    ({"group_by": "week"}, "group_by"), ({"from": "last tuesday"}, "from"), ({"to": "x"}, "to"),
    ({"from": "2025-02-01", "to": "2025-01-01"}, "from"), ({"format": "xml"}, "format"), ({"keys": "a"}, "keys")])
def test_usage_refuses_a_bad_query_naming_it(admin, query, param):
    error = assert_openai_envelope(admin().get("/admin/usage", query_string=query, headers=ADMIN), 400)
    assert error["param"] == param


def test_keys_and_usage_on_postgresql(postgres_url, admin):  # postgres_url first: the database outlives the app
    client = admin(postgres_url)
    now = time.time()
    made = _flushed_usage(client, now)
    assert [key["name"] for key in client.get("/admin/keys", headers=ADMIN).get_json()["data"]] == ["team-u", TEAM_ID]
    rows = client.get("/admin/usage", query_string={"key": made["id"], "group_by": "day"}, headers=ADMIN).get_json()
    assert sum(row["requests"] for row in rows["data"]) == 3
    revoked = client.delete(f"/admin/keys/{made['id']}", headers=ADMIN).get_json()
    assert revoked["status"] == "revoked"
