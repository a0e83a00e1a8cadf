"""API keys: parsing, constant-time lookup, 401s in the envelope, and the paths that need no key."""
import pytest

from service.policy.auth import KeyRing, derived_client_id
from service.config import ConfigError, load_settings
from tests.clients import assert_openai_envelope

KEYS = {"OPENAI_API_KEY": "local", "OPENAI_API_KEYS": "key-a-123:team_a,key-b-456:team_b,key-c-789"}


@pytest.mark.parametrize("value, words", [
    ("", None),  # blank: unset
    (",key", "entry 1 has an empty key"),
    ("a:team,,b", "entry 2 has an empty key"),
    (":team", "entry 1 has an empty key"),
    ("a:", "entry 1 has a bad client id"),
    ("a:team:x", "more than one ':'"),
    ("a:te am", "bad client id"),
    ("a:" + "t" * 65, "bad client id"),
    ("a:team,a:other", "entry 2 repeats an earlier key"),
    ("has space:team", "no spaces"),
    ("tab\there", "no spaces"),
])
def test_key_list_parsing(value, words):
    if words is None:
        assert load_settings({"OPENAI_API_KEYS": value})["OPENAI_API_KEYS"] is None
        return
    with pytest.raises(ConfigError) as caught:
        load_settings({"OPENAI_API_KEYS": value})
    assert str(caught.value).startswith("OPENAI_API_KEYS: ") and words in str(caught.value)


def test_errors_never_echo_a_key():
    for value in ("secret-one:te am", "secret-one:x,secret-one:y", "secret two"):
        with pytest.raises(ConfigError) as caught:
            load_settings({"OPENAI_API_KEYS": value})
        assert "secret" not in str(caught.value)


def test_the_single_key_may_not_repeat_in_the_list():
    with pytest.raises(ConfigError, match="repeats the key of OPENAI_API_KEY"):
        load_settings({"OPENAI_API_KEY": "k1", "OPENAI_API_KEYS": "k1:team"})


def test_keyring_maps_keys_to_clients():
    ring = KeyRing.from_settings(load_settings(KEYS))
    assert ring.client_for("local") == "default"
    assert ring.client_for("key-a-123") == "team_a"
    assert ring.client_for("key-c-789") == derived_client_id("key-c-789")
    assert ring.client_for("nope") is None
    assert ring.client_ids == ["default", "team_a", "team_b", derived_client_id("key-c-789")]


def test_several_keys_may_share_one_client():
    ring = KeyRing.from_settings(load_settings({"OPENAI_API_KEYS": "key-1:team,key-2:team,key-3:other"}))
    assert (ring.client_for("key-1"), ring.client_for("key-2"), ring.client_for("key-3")) == ("team", "team", "other")
    assert ring.client_ids == ["team", "other"]


def test_derived_client_id_is_stable_and_reveals_nothing():
    client = derived_client_id("key-c-789")
    assert client == derived_client_id("key-c-789")  # the same across restarts: no random salt
    assert client != derived_client_id("key-c-780")
    assert "key-c" not in client and "789" not in client


@pytest.fixture
def keyed_client(make_app, httpserver):
    httpserver.expect_request("/v1/models").respond_with_json({"data": [{"id": "m"}]})
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    return make_app(httpserver.url_for("").rstrip("/"), **KEYS).test_client()


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer local"},
    {"Authorization": "bearer key-a-123"},
    {"x-api-key": "key-b-456"},
    {"Authorization": "Basic Zm9vOmJhcg==", "x-api-key": "local"},
])
def test_accepted_keys(keyed_client, headers):
    assert keyed_client.get("/v1/models", headers=headers).status_code == 200


@pytest.mark.parametrize("headers, words", [
    ({}, "Missing API key"),
    ({"Authorization": "Bearer"}, "Missing API key"),
    ({"Authorization": "Bearer wrong"}, "Incorrect API key"),
    ({"Authorization": "Bearer LOCAL"}, "Incorrect API key"),  # no case folding
    ({"Authorization": "Bearer  local"}, "Incorrect API key"),  # no trimming
    ({"Authorization": "Bearer local-"}, "Incorrect API key"),
    ({"x-api-key": "key-a-12"}, "Incorrect API key"),
])
def test_refused_keys_are_401(keyed_client, httpserver, headers, words):
    response = keyed_client.get("/v1/models", headers=headers)
    error = assert_openai_envelope(response, 401)
    assert words in error["message"]
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "local" not in response.get_data(as_text=True)
    assert httpserver.log == []  # refused before the upstream is called


def test_unknown_routes_need_a_key_too(keyed_client):
    assert_openai_envelope(keyed_client.get("/v1/secret-route"), 401)


def test_health_and_preflight_need_no_key(keyed_client):
    assert keyed_client.get("/health").status_code == 200
    assert keyed_client.options("/v1/chat/completions").status_code == 200


def test_metrics_are_public_unless_configured(make_app, httpserver):
    url = httpserver.url_for("").rstrip("/")
    assert make_app(url, **KEYS).test_client().get("/metrics").status_code == 200
    guarded = make_app(url, METRICS_REQUIRE_KEY="1", **KEYS).test_client()
    assert_openai_envelope(guarded.get("/metrics"), 401)
    assert guarded.get("/metrics", headers={"Authorization": "Bearer local"}).status_code == 200


def test_no_key_configured_means_open_access(fake_client, httpserver):
    httpserver.expect_request("/v1/models").respond_with_json({"data": [{"id": "m"}]})
    assert fake_client.get("/v1/models").status_code == 200
    assert fake_client.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200
