"""The admin API of models on demand: POST /models/load and /models/unload, for ADMIN_API_KEY alone."""
import json
import logging

import pytest

from service.errors import ApiError
from service.models.spec import ModelSet, ModelSpec
from service.operations.logs import JsonFormatter
from tests.apps import routed_app
from tests.clients import assert_openai_envelope

ADMIN_KEY = "sk-admin-very-secret-4321"
CLIENT_KEY = "sk-client-key"
TEAM_KEY = "sk-team-key"
KEYS = {"ADMIN_API_KEY": ADMIN_KEY, "OPENAI_API_KEY": CLIENT_KEY, "OPENAI_API_KEYS": f"{TEAM_KEY}:team"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
UNUSED_URL = "http://127.0.0.1:9"  # never called: the admin API talks to the pool, not to a llama-server
PATHS = ("/models/load", "/models/unload")


class FakePool:
    """The model pool's interface, recording each call; reason has no default, so a view must say it."""

    def __init__(self, *names, error=None):
        self.names, self.error, self.calls = set(names), error, []

    def model_named(self, name):
        """A stand-in for the pooled model, or None."""
        return object() if name in self.names else None

    def load(self, name, *, reason):
        """Record the load; answer as a finished load does, or raise the load's error."""
        self.calls.append(("load", name, reason))
        if self.error:
            raise self.error
        return "loaded"

    def unload(self, name, *, reason):
        """Record the unload; answer as a finished unload does."""
        self.calls.append(("unload", name, reason))
        return "unloaded"


class LoadFailed(ApiError):
    """As the pool's own load failure: a 503 with its code."""

    status = 503
    code = "model_load_failed"


@pytest.fixture
def gateway(make_app):
    """build(pool=..., **settings): a keyed app routing 'chat' (the pool's) and 'remote' (someone else's);
    returns (test client, pool)."""

    def build(pool=None, **settings):
        pool = pool or FakePool("chat")
        app = routed_app(make_app, {"chat": [UNUSED_URL], "remote": [UNUSED_URL]}, **{**KEYS, **settings})
        app.extensions["model_pool"] = pool
        return app.test_client(), pool

    return build


def post(client, path, body=None, headers=ADMIN, **options):
    """POST body (JSON) to path, closing the answer as a server would (which writes its log line)."""
    response = client.post(path, json={"model": "chat"} if body is None else body, headers=headers, **options)
    response.close()
    return response


@pytest.mark.parametrize("path", PATHS)
def test_without_a_key_is_401(gateway, path):
    client, pool = gateway()
    error = assert_openai_envelope(post(client, path, headers={}), 401)
    assert error["code"] == "invalid_api_key" and "ADMIN_API_KEY" in error["message"]
    assert pool.calls == []


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer sk-wrong"}, {"x-api-key": "sk-wrong"},
                                     {"Authorization": f"Basic {ADMIN_KEY}"}])
def test_with_an_unknown_key_is_401(gateway, headers):
    client, pool = gateway()
    response = post(client, "/models/load", headers=headers)
    assert assert_openai_envelope(response, 401)["code"] == "invalid_api_key"
    assert response.headers["WWW-Authenticate"] == "Bearer" and pool.calls == []


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {CLIENT_KEY}"}, {"x-api-key": TEAM_KEY}])
@pytest.mark.parametrize("path", PATHS)
def test_with_a_client_key_is_403(gateway, headers, path):
    client, pool = gateway()
    error = assert_openai_envelope(post(client, path, headers=headers), 403)
    assert error["code"] == "admin_key_required" and error["type"] == "permission_error"
    assert "ADMIN_API_KEY" in error["message"] and pool.calls == []


def test_the_admin_key_is_no_client_key(gateway):
    client, _ = gateway()
    response = client.get("/v1/models", headers=ADMIN)
    assert assert_openai_envelope(response, 401)["code"] == "invalid_api_key"


@pytest.mark.parametrize("headers", [{}, ADMIN, {"Authorization": f"Bearer {CLIENT_KEY}"}])
@pytest.mark.parametrize("path", PATHS)
def test_routes_are_off_while_admin_api_key_is_unset(gateway, headers, path):
    client, pool = gateway(ADMIN_API_KEY="")
    error = assert_openai_envelope(post(client, path, headers=headers), 404)
    assert "set ADMIN_API_KEY" in error["message"] and error["code"] == "admin_api_disabled"
    assert pool.calls == []


@pytest.mark.parametrize("path", PATHS)
def test_unknown_model_is_404(gateway, path):
    client, pool = gateway()
    error = assert_openai_envelope(post(client, path, {"model": "nope"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model" and "'nope'" in error["message"]
    assert pool.calls == []


def test_a_name_the_pool_does_not_run_is_404_behind_one_local_model(make_app):
    # One local model chosen without MODEL_PATHS is routed for any name; the admin names it as the pool does.
    app = make_app(UNUSED_URL, **KEYS)
    app.extensions["model_pool"] = pool = FakePool("demo")
    client = app.test_client()
    assert assert_openai_envelope(post(client, "/models/load", {"model": "gpt-4o"}), 404)["code"] == "model_not_found"
    assert post(client, "/models/load", {"model": "demo"}).status_code == 200
    assert pool.calls == [("load", "demo", "admin")]


@pytest.mark.parametrize("path, call", [("/models/load", "load"), ("/models/unload", "unload")])
def test_an_alias_names_its_model(gateway, path, call):
    client, pool = gateway()
    router = client.application.extensions["router"]
    router.apply(ModelSet((ModelSpec("chat", upstreams=(UNUSED_URL,), aliases=("gpt-4o-mini",)),
                           ModelSpec("remote", upstreams=(UNUSED_URL,), aliases=("theirs",)))))
    assert post(client, path, {"model": "gpt-4o-mini"}).status_code == 200
    assert pool.calls == [(call, "chat", "admin")], "the pool was not told the model's id"
    # An alias of a model someone else runs is that model: 400, not 404.
    assert assert_openai_envelope(post(client, path, {"model": "theirs"}), 400)["code"] == "model_not_managed"


def test_an_id_wins_over_another_model_s_alias_as_in_the_routes(gateway):
    # The models file refuses such a set; a router given one lets the id win, and the admin must name the same model.
    client, pool = gateway(FakePool("chat", "remote"))
    router = client.application.extensions["router"]
    router.apply(ModelSet((ModelSpec("chat", upstreams=(UNUSED_URL,), aliases=("remote",)),
                           ModelSpec("remote", upstreams=(UNUSED_URL,)))))
    assert router.route("remote").name == "remote"
    assert post(client, "/models/unload", {"model": "remote"}).status_code == 200
    assert pool.calls == [("unload", "remote", "admin")], "the admin unloaded the model whose alias it is"


@pytest.mark.parametrize("path", PATHS)
def test_a_model_the_gateway_does_not_run_is_400(gateway, path):
    client, pool = gateway()
    error = assert_openai_envelope(post(client, path, {"model": "remote"}), 400)
    assert error["param"] == "model" and "never loads or unloads a llama-server it does not run" in error["message"]
    assert pool.calls == []


def test_any_model_behind_llama_server_url_alone_is_400(make_app):
    # No pool: the gateway runs no llama.cpp, and the one it proxies to takes any model name.
    client = make_app(UNUSED_URL, **KEYS).test_client()
    error = assert_openai_envelope(post(client, "/models/unload", {"model": "anything"}), 400)
    assert "does not run" in error["message"]


@pytest.mark.parametrize("body, words", [
    ({}, "Invalid 'model': Missing data for required field."),
    ({"model": 3}, "Invalid 'model': Not a valid string."),
    ({"model": ""}, "Invalid 'model'"),
    ([], "must be a JSON object"),
])
def test_bad_body_is_400_naming_the_problem(gateway, body, words):
    client, pool = gateway()
    error = assert_openai_envelope(post(client, "/models/load", body), 400)
    assert words in error["message"] and pool.calls == []


def test_body_that_is_not_json_is_400(gateway):
    client, _ = gateway()
    response = client.post("/models/load", data=b"{model: chat", headers={**ADMIN, "Content-Type": "application/json"})
    assert "not valid JSON" in assert_openai_envelope(response, 400)["message"]


def test_load_and_unload_call_the_pool_as_admin(gateway):
    client, pool = gateway()
    loaded = post(client, "/models/load")
    assert loaded.status_code == 200 and loaded.get_json() == {"success": True, "status": "loaded"}
    unloaded = post(client, "/models/unload", headers={"x-api-key": ADMIN_KEY})
    assert unloaded.status_code == 200 and unloaded.get_json() == {"success": True, "status": "unloaded"}
    assert pool.calls == [("load", "chat", "admin"), ("unload", "chat", "admin")]


def test_a_failed_load_answers_the_pool_s_error(gateway):
    client, _ = gateway(FakePool("chat", error=LoadFailed("The model 'chat' failed to load: bad file")))
    error = assert_openai_envelope(post(client, "/models/load"), 503)
    assert error["code"] == "model_load_failed" and "bad file" in error["message"]


def test_client_limits_do_not_apply_to_the_admin(gateway):
    client, pool = gateway(RATE_LIMIT_RPM="1", RATE_LIMIT_CONCURRENT="1")
    assert [post(client, "/models/load").status_code for _ in range(3)] == [200, 200, 200]
    assert len(pool.calls) == 3


def test_a_cors_preflight_needs_no_key_and_is_granted_no_cors(gateway):
    client, _ = gateway(CORS_ORIGINS="https://app.example")
    response = client.options("/models/load", headers={"Origin": "https://app.example",
                                                       "Access-Control-Request-Method": "POST"})
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers  # CORS_ORIGINS is for the API, not admin routes


def test_admin_requests_are_logged_as_admin_never_with_the_key(gateway, caplog):
    caplog.set_level(logging.INFO)
    client, _ = gateway()
    post(client, "/models/load", headers={**ADMIN, "x-request-id": "admin-ok"})
    post(client, "/models/load", headers={"Authorization": f"Bearer {ADMIN_KEY}-typo", "x-request-id": "admin-bad"})
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    requests = {line["request_id"]: line for line in map(json.loads, lines) if line["event"] == "request"}
    assert requests["admin-ok"]["client_id"] == "admin" and requests["admin-ok"]["status"] == 200
    assert requests["admin-ok"]["path"] == "/models/load"
    assert requests["admin-bad"]["status"] == 401 and "client_id" not in requests["admin-bad"]
    assert not [line for line in lines if ADMIN_KEY in line]
