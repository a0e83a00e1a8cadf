"""create_app: settings from a mapping or the environment, nothing at import time."""
import pytest

from service import create_app
from service.config import ConfigError


def test_config_mapping_sets_the_app(make_app):
    app = make_app("http://127.0.0.1:9", WAITRESS_THREADS="3", MAX_BODY_BYTES="1000")
    assert app.config["TESTING"] is True
    assert app.config["WAITRESS_THREADS"] == 3
    assert app.config["MAX_CONTENT_LENGTH"] == 1000
    assert app.extensions["upstream"].base_url == "http://127.0.0.1:9"


def test_environment_is_read_when_no_config_is_given(monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER_URL", "http://127.0.0.1:7")
    monkeypatch.setenv("CHAT_READ_TIMEOUT_S", "42")
    app = create_app()
    assert app.extensions["upstream"].timeouts["chat"] == (5.0, 42.0)


def test_an_upstream_url_is_required():
    with pytest.raises(ConfigError, match="LLAMA_SERVER_URL"):
        create_app({})


def test_two_apps_live_side_by_side(make_app):
    # Each app has its own metrics registry: a second app must not collide with the first.
    first, second = make_app("http://127.0.0.1:9"), make_app("http://127.0.0.1:9")
    assert first.test_client().get("/metrics").status_code == 200
    assert second.test_client().get("/metrics").status_code == 200
