"""Keys made at run time, on a real store (SQLite): who they authenticate as, revoked and expired keys, open
access once a key exists, a database that is down, their own limits and weight, and their models."""
import time

import pytest
import sqlalchemy.exc

from service.policy import hooks
from service.policy.key_limits import KeyLimits, own_limits
from service.policy.limits import Limits, RateLimiter
from service.policy.model_access import ModelNotAllowed, check_model_allowed
from tests.apps import routed_app
from tests.clients import assert_openai_envelope

CHAT = "/v1/chat/completions"
COMPLETION = {"object": "chat.completion", "choices": [],
              "usage": {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}}
ENV_KEYS = {"OPENAI_API_KEYS": "key-a:team_a"}


def with_store(app, url, failure="open"):
    """Give app a real store at url, as the factory does with DATABASE_URL (until it does so itself)."""
    from service.store import open_store

    if app.extensions.get("store") is None:
        app.extensions["store"] = open_store(url, failure=failure)
        hooks.init_store_policy(app)
    return app.extensions["store"]


@pytest.fixture
def gateway(make_app, httpserver, tmp_path):
    """build(**settings) -> (test client, store): a gateway over a fake upstream, its keys in SQLite."""
    stores = []

    def build(failure="open", routes=None, **settings):
        url = httpserver.url_for("").rstrip("/")
        app = (routed_app(make_app, {name: [url] for name in routes}, **settings) if routes
               else make_app(url, **settings))
        stores.append(with_store(app, f"sqlite:///{tmp_path / 'keys.db'}", failure))
        return app.test_client(), stores[-1]

    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    yield build
    for store in stores:
        store.close()


def bearer(secret) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def post(client, headers, model="llama"):
    response = client.post(CHAT, json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                           headers=headers)
    response.close()  # as a server would: the log line, the sinks, the limiter's release
    return response


def records(client) -> list:
    """The records of the requests that client's app logs from now on."""
    seen = []
    client.application.extensions["request_sinks"].append(lambda entry, record: seen.append(record))
    return seen


def test_a_stored_key_is_its_named_client(gateway):
    client, store = gateway(**ENV_KEYS)
    key, secret = store.keys.create("team-b")
    seen = records(client)
    assert post(client, bearer(secret)).status_code == 200
    assert (seen[-1].client_id, seen[-1].key_id) == ("team-b", key.id)
    assert post(client, bearer("key-a")).status_code == 200  # the environment's keys work as before
    assert (seen[-1].client_id, seen[-1].key_id) == ("team_a", None)


def test_revoked_expired_and_unknown_keys_are_401_saying_why(gateway):
    client, store = gateway(**ENV_KEYS)
    revoked, revoked_secret = store.keys.create("gone")
    store.keys.revoke(revoked.id)
    expired, expired_secret = store.keys.create("old", expires_at=1_700_000_000.0)
    for secret, words in ((revoked_secret, "This API key was revoked"),
                          (expired_secret, "This API key expired at 2023-11-14T22:13:20Z"),
                          ("sk-gw-" + "x" * 40, "Incorrect API key provided")):
        response = post(client, bearer(secret))
        error = assert_openai_envelope(response, 401)
        assert error["message"] == words and error["code"] == "invalid_api_key"
        assert secret not in response.get_data(as_text=True)


def test_open_access_ends_with_the_first_stored_key_and_stays_ended(gateway):
    client, store = gateway()  # no key in the environment: open
    assert post(client, {}).status_code == 200
    key, secret = store.keys.create("first")
    assert_openai_envelope(post(client, {}), 401)  # a gateway with stored keys needs a key
    assert post(client, bearer(secret)).status_code == 200
    store.keys.revoke(key.id)
    assert_openai_envelope(post(client, {}), 401)  # revoking the last key does not open it to everyone


def database_down(store, monkeypatch):
    """The database stops answering: the store's rounds fail, and it says it is unhealthy."""
    outage = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("database is down"))

    def fail():
        raise outage
    monkeypatch.setattr(store, "sync", fail)
    store.health.failed(outage)


@pytest.mark.parametrize("failure, unknown_status", [("closed", 503), ("open", 401)])
def test_a_database_down(gateway, monkeypatch, failure, unknown_status):
    client, store = gateway(failure=failure, **ENV_KEYS)
    _, secret = store.keys.create("known")
    database_down(store, monkeypatch)
    assert post(client, bearer(secret)).status_code == 200  # from the cache
    assert post(client, bearer("key-a")).status_code == 200  # the environment's, as ever
    error = assert_openai_envelope(post(client, bearer("sk-gw-" + "y" * 40)), unknown_status)
    assert error["code"] == ("database_unavailable" if failure == "closed" else "invalid_api_key")
    assert_openai_envelope(post(client, bearer("not-ours")), 401)  # never a stored key: no database needed


def test_a_key_s_own_limits_win_and_a_change_applies_at_once(gateway):
    client, store = gateway(RATE_LIMIT_RPM="1", RATE_LIMITS="team_a:rpm=2", **ENV_KEYS)
    key, secret = store.keys.create("team-b", rpm=2)
    assert [post(client, bearer(secret)).status_code for _ in range(3)] == [200, 200, 429]
    error = assert_openai_envelope(post(client, bearer(secret)), 429)
    assert error["message"].startswith("Rate limit reached for team-b: 2 requests per minute")
    store.keys.update(key.id, rpm=4)  # no restart
    assert [post(client, bearer(secret)).status_code for _ in range(3)] == [200, 200, 429]
    assert [post(client, bearer("key-a")).status_code for _ in range(3)] == [200, 200, 429]  # RATE_LIMITS holds


def test_a_key_s_limits_turn_the_limiter_on(gateway):
    client, store = gateway(**ENV_KEYS)  # no limit configured: the limiter is off
    _, secret = store.keys.create("limited", tpm=50)
    assert [post(client, bearer(secret)).status_code for _ in range(2)] == [200, 429]
    assert [post(client, bearer("key-a")).status_code for _ in range(3)] == [200, 200, 200]


def test_a_key_s_weight_goes_to_the_fair_scheduler(gateway):
    client, store = gateway(RATE_LIMITS="heavy:weight=3", **ENV_KEYS)
    weights = client.application.extensions["scheduler"].weights
    key, secret = store.keys.create("heavy", weight=5)
    assert weights["heavy"] == 5  # the store told the policy at once (on_change)
    store.keys.update(key.id, weight=None)
    assert weights["heavy"] == 3  # back to RATE_LIMITS'
    other, _ = store.keys.create("light", weight=2)
    store.keys.revoke(other.id)
    assert "light" not in weights


def test_own_limits_fill_what_a_key_leaves_unset():
    configured = Limits(rpm=10, tpm=100, concurrent=2)
    key = type("Key", (), {"rpm": None, "tpm": 500, "concurrent": 0})()
    assert own_limits(key, configured) == Limits(rpm=10, tpm=500, concurrent=0)  # 0: no limit, as configured
    key.tpm, key.concurrent = None, None
    assert own_limits(key, configured) is None


def test_shared_limiter_takes_a_key_s_limits_too():
    from service.policy.shared_limits import SharedRateLimiter

    limiter = SharedRateLimiter("redis://127.0.0.1:9/0", Limits())
    assert not limiter.active
    limiter.set_own("team", Limits(concurrent=1))
    assert limiter.active and limiter.limits_for("team") == Limits(concurrent=1)
    limiter.set_own("team", None)
    assert not limiter.active and limiter.limits_for("team") == Limits()


def test_renamed_key_lets_go_of_its_old_name():
    limiter = RateLimiter(Limits())
    key_limits = KeyLimits(limiter)
    key = type("Key", (), {"id": "key_1", "name": "old", "rpm": 5, "tpm": None, "concurrent": None,
                           "weight": None})()
    key_limits.apply(key)
    renamed = type("Key", (), {**{k: getattr(key, k) for k in ("id", "rpm", "tpm", "concurrent", "weight")},
                               "name": "new"})()
    key_limits.apply(renamed)
    assert limiter.limits_for("old") == Limits() and limiter.limits_for("new") == Limits(rpm=5)


def test_a_key_limited_to_models_lists_and_gets_only_those(gateway, httpserver):
    client, store = gateway(routes=["chat", "embed", "other"], **ENV_KEYS)
    _, secret = store.keys.create("team-c", models=["chat", "embed"])
    listed = client.get("/v1/models", headers=bearer(secret)).get_json()["data"]
    assert [model["id"] for model in listed] == ["chat", "embed"]
    assert len(client.get("/v1/models", headers=bearer("key-a")).get_json()["data"]) == 3
    assert client.get("/v1/models/chat", headers=bearer(secret)).status_code == 200
    error = assert_openai_envelope(client.get("/v1/models/other", headers=bearer(secret)), 403)
    assert error["code"] == "model_not_allowed" and "'other'" in error["message"]
    assert "chat, embed" in error["message"]


def test_check_model_allowed_takes_ids_aliases_and_route_names(fake_app):
    from service.models.spec import ModelSpec
    from service.proxy.routing import ModelRoute

    route = ModelRoute("chat", [], spec=ModelSpec("chat", aliases=("gpt-4o",)))
    with fake_app.test_request_context():
        from flask import g

        check_model_allowed(route)  # no stored key: every model
        for allowed in (("chat",), ("gpt-4o",), None):
            g.stored_key = type("Key", (), {"models": allowed})()
            check_model_allowed(route)
        g.stored_key.models = ("embed",)
        with pytest.raises(ModelNotAllowed) as caught:
            check_model_allowed(route)
        assert caught.value.status == 403 and "'chat'" in caught.value.message


def test_the_relay_refuses_a_model_the_key_may_not_use_and_counts_no_use(gateway):
    client, store = gateway(routes=["chat", "other"], **ENV_KEYS)
    key, secret = store.keys.create("team-c", models=["chat"])
    assert post(client, bearer(secret), model="chat").status_code == 200
    error = assert_openai_envelope(post(client, bearer(secret), model="other"), 403)
    assert error["code"] == "model_not_allowed"
    rows = store.usage.query(time.time() - 3600, time.time() + 3600, key=key.id)
    assert [(row["model"], row["requests"]) for row in rows] == [("chat", 1)]  # the refusal used nothing
