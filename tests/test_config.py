"""The settings table: defaults, conversions, and one clear error per bad value."""
import json

import pytest

from service.config import (SETTINGS, ConfigError, Setting, load_settings, local_base_url, route_timeouts,
                            settings_summary, unknown_settings)
from service.converters import url


def test_defaults_when_nothing_is_set():
    settings = load_settings({})
    assert settings["API_HOST"] == "127.0.0.1"
    assert settings["API_PORT"] == 8000
    assert settings["LLAMA_SERVER_URL"] is None
    assert settings["LLAMA_EMBEDDINGS"] is True
    assert settings["UPSTREAM_RETRIES"] == 2


def test_every_setting_has_a_help_line_and_a_default_that_converts():
    for setting in SETTINGS:
        assert setting.help, setting.name
        if setting.default is not None:
            assert setting.convert(str(setting.default)) == setting.default, setting.name


def test_converted_values_pass_through_unchanged():
    settings = load_settings({"OPENAI_API_KEYS": "a:team_a,b", "RATE_LIMITS": "team_a:rpm=5", "API_PORT": "9000"})
    assert load_settings(settings) == settings


def test_values_are_converted():
    settings = load_settings({"API_PORT": "9001", "LLAMA_EMBEDDINGS": "off", "CHAT_READ_TIMEOUT_S": "1.5",
                              "LLAMA_SERVER_URL": "http://127.0.0.1:8080/", "UPSTREAM_BACKOFF_S": "0"})
    assert settings["API_PORT"] == 9001
    assert settings["LLAMA_EMBEDDINGS"] is False
    assert settings["CHAT_READ_TIMEOUT_S"] == 1.5
    assert settings["LLAMA_SERVER_URL"] == "http://127.0.0.1:8080"
    assert settings["UPSTREAM_BACKOFF_S"] == 0.0


def test_blank_values_mean_the_default():
    assert load_settings({"API_PORT": "  "})["API_PORT"] == 8000


@pytest.mark.parametrize("name, value, words", [
    ("API_PORT", "abc", "whole number"),
    ("API_PORT", "70000", "port number"),
    ("CHAT_READ_TIMEOUT_S", "-1", "above 0"),
    ("EMBEDDINGS_CONNECT_TIMEOUT_S", "soon", "number of seconds"),
    ("UPSTREAM_RETRIES", "-2", "0 or more"),
    ("WAITRESS_THREADS", "0", "1 or more"),
    ("LLAMA_EMBEDDINGS", "maybe", "on or off"),
    ("LLAMA_SERVER_URL", "localhost:8080", "http://"),
    ("LLAMA_MODEL", "/no/such/model.gguf", "no such model file"),
    ("LOG_LEVEL", "LOUD", "one of"),
])
def test_bad_values_name_the_variable_and_the_problem(name, value, words):
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})
    assert str(caught.value).startswith(f"{name}: ")
    assert words in str(caught.value)


def test_route_timeouts_pair_connect_and_read_per_group():
    timeouts = route_timeouts(load_settings({"CHAT_CONNECT_TIMEOUT_S": "3", "CHAT_READ_TIMEOUT_S": "90"}))
    assert timeouts["chat"] == (3.0, 90.0)
    assert set(timeouts) == {"chat", "completions", "embeddings", "models"}


def test_env_example_and_the_settings_table_are_generated_from_the_table():
    import os

    from service.config import render_env_example, render_settings_table

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, ".env.example")) as example:
        text = example.read()
    assert text == render_env_example(), "regenerate: python -m service.config > .env.example"
    values = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert set(values) == {setting.name for setting in SETTINGS}
    assert load_settings(values) == load_settings({})
    with open(os.path.join(root, "docs", "configuration.md"), encoding="utf-8") as reference:
        assert render_settings_table() in reference.read()


# What must never reach a log line or an error message.
SECRET = "s3cr3t"


@pytest.mark.parametrize("name, value, shown", [
    ("LLAMA_API_KEY", f"sk-{SECRET}", True),
    ("OPENAI_API_KEY", f"sk-{SECRET}", True),
    ("OPENAI_API_KEYS", f"sk-{SECRET}:team_a,other", 2),
    ("RATE_LIMIT_REDIS_URL", f"redis://:{SECRET}@127.0.0.1:6379/0", True),
    ("LLAMA_SERVER_URL", f"http://alice:{SECRET}@127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("MODEL_UPSTREAMS", f"chat=http://alice:{SECRET}@h1:8080|http://h2:8080,embed=https://bob:{SECRET}@h3",
     {"chat": ["http://h1:8080", "http://h2:8080"], "embed": ["https://h3"]}),
])
def test_summary_hides_every_secret(name, value, shown):
    summary = settings_summary(load_settings({name: value}))
    assert SECRET not in json.dumps(summary)
    assert summary[name] == shown


@pytest.mark.parametrize("value", ["http://h1:8080/api/@me", "http://h1:8080/x?a=@b", "http://h1:8080/#@me"])
def test_an_at_sign_past_the_host_is_refused(value):
    # Two replicas shown as "http://me" would share one label in logs, metrics and /health.
    with pytest.raises(ValueError, match="after its host h1"):
        url(value)


def test_any_url_setting_is_shown_without_credentials_whatever_its_name():
    # The converter declares how its values are shown: a new URL setting needs no name in a list.
    setting = Setting("SOME_NEW_URL", url, None, "a URL")
    assert setting.shown(url(f"https://alice:{SECRET}@example.com:8443/v1")) == "https://example.com:8443/v1"
    assert setting.shown(None) is None


@pytest.mark.parametrize("name, value", [
    ("LLAMA_SERVER_URL", f"ftp://alice:{SECRET}@host:8080"),
    ("LLAMA_SERVER_URL", f"http://alice:{SECRET}@host:80x"),
    ("LLAMA_SERVER_URL", f"http://alice:s3/{SECRET}@host:8080"),  # urlsplit ends the host at the '/'
    ("LLAMA_SERVER_URL", f"alice:{SECRET}@host:8080"),
    ("LLAMA_SERVER_URL", f"http://alice:{SECRET}@[host:8080"),  # urlsplit raises: an unclosed [
    ("MODEL_UPSTREAMS", f"chat=ftp://alice:{SECRET}@host:8080"),
    ("MODEL_UPSTREAMS", f"chat=http://h:1|http://alice:{SECRET}@host:bad"),
    ("MODEL_UPSTREAMS", f"http://alice:{SECRET}@host:8080"),
    ("MODEL_UPSTREAMS", f"bad name=http://alice:{SECRET}@host:8080"),
    ("CORS_ORIGINS", f"https://alice:{SECRET}@host"),
    ("LLAMA_SERVER_URL", f"http://alice:{SECRET}@host:8080/api/@me"),  # shown, it would name host "me"
])
def test_bad_urls_are_named_without_their_credentials(name, value):
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})
    message = str(caught.value)
    assert message.startswith(f"{name}: ")
    assert SECRET not in message and "alice" not in message
    assert "host" in message  # still says which URL is wrong


def test_the_admin_client_id_and_key_are_the_admins_alone():
    with pytest.raises(ConfigError, match="client id 'admin'"):
        load_settings({"OPENAI_API_KEYS": "k1:team,k2:admin"})
    with pytest.raises(ConfigError, match="ADMIN_API_KEY: must differ"):
        load_settings({"OPENAI_API_KEYS": "k1:team", "ADMIN_API_KEY": "k1"})


@pytest.mark.parametrize("names, found", [
    (["RATE_LIMT_RPM"], [("RATE_LIMT_RPM", "RATE_LIMIT_RPM")]),  # a slip: close to a setting
    (["rate_limit_rpm"], [("rate_limit_rpm", "RATE_LIMIT_RPM")]),  # the case: settings are upper case
    (["LLAMA_CTX_SIZE"], [("LLAMA_CTX_SIZE", "LLAMA_CTX")]),  # the gateway's prefix, and near enough to name one
    (["LLAMA_GPU_LAYERS"], [("LLAMA_GPU_LAYERS", None)]),  # the gateway's prefix, near none
    (["API_PORT", "RATE_LIMIT_RPM", "MODEL_SETTINGS"], []),  # real settings
    # Other programs' variables: the system's, the OpenAI SDK's, llama.cpp's own.
    (["PATH", "HOME", "PORT", "HOSTNAME", "LOGNAME", "OPENAI_API_BASE", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY",
      "HF_TOKEN", "LLAMA_ARG_CTX_SIZE", "LLAMA_CACHE", "PYTHONPATH", "LLAMA_OFFLINE", "LLAMA_SERVER_SLOTS_DEBUG",
      "MODEL_NAME", "MODEL_ID"], []),
    (["MODEL_SETINGS"], [("MODEL_SETINGS", "MODEL_SETTINGS")]),  # no prefix rule for MODEL_: closeness finds it
])
def test_names_that_look_like_settings_but_are_not(names, found):
    assert unknown_settings(names) == found


@pytest.mark.parametrize("source, url", [
    ({}, "http://127.0.0.1:8000"),
    ({"API_HOST": "0.0.0.0", "API_PORT": "9001"}, "http://127.0.0.1:9001"),  # a wildcard is reached on loopback
    ({"API_HOST": "::", "API_PORT": 9002}, "http://[::1]:9002"),
    ({"API_HOST": "::1"}, "http://[::1]:8000"),
    ({"API_HOST": "10.0.0.5", "OTHER": "x"}, "http://10.0.0.5:8000"),
])
def test_local_base_url_follows_api_host_and_port(source, url):
    assert local_base_url(source) == url


def test_local_base_url_names_a_bad_port():
    with pytest.raises(ConfigError, match="^API_PORT: "):
        local_base_url({"API_PORT": "eighty"})
