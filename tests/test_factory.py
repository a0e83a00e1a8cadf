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


def metric(client, line_start: str) -> float:
    """The value of the one /metrics sample whose line starts with line_start, or 0 if it has none."""
    lines = client.get("/metrics").get_data(as_text=True).splitlines()
    found = [float(line.rpartition(" ")[2]) for line in lines if line.startswith(line_start)]
    assert len(found) <= 1, found
    return found[0] if found else 0.0


def test_two_apps_live_side_by_side(make_app, fake_upstreams):
    # Two gateways in one process, each with its own upstream, keys, limits, limiter and metrics registry: the
    # same client id in both, so that any state shared between them would show in the other's answers.
    upstreams = fake_upstreams(2)
    for server, token in zip(upstreams, (1, 2)):
        server.expect_request("/tokenize").respond_with_json({"tokens": [token]})
    first = make_app(upstreams[0].url_for("").rstrip("/"), OPENAI_API_KEYS="shared-key:team,first-only:solo",
                     RATE_LIMIT_RPM="1")
    second = make_app(upstreams[1].url_for("").rstrip("/"), OPENAI_API_KEYS="shared-key:team", RATE_LIMIT_RPM="2")
    for name in ("upstream", "keyring", "limiter", "gateway_metrics"):
        assert first.extensions[name] is not second.extensions[name], name
    one, two = first.test_client(), second.test_client()
    key = {"Authorization": "Bearer shared-key"}

    def tokenize(client, headers):
        # A request that counts against the client limits (model listings do not).
        response = client.post("/tokenize", headers=headers, json={"content": "hi"})
        response.close()  # as a server would: the request's record is counted on close
        return response

    answer = tokenize(one, key)
    assert answer.status_code == 200 and answer.get_json()["tokens"] == [1]
    assert answer.headers["x-ratelimit-limit-requests"] == "1"
    assert tokenize(one, key).status_code == 429  # the first app's one request a minute is used up
    assert tokenize(one, {"Authorization": "Bearer first-only"}).status_code == 200
    assert tokenize(two, {"Authorization": "Bearer first-only"}).status_code == 401  # a key of the first app only

    # The second app's limit for the same client is untouched by the first's: two requests, then its own 429.
    answers = [tokenize(two, key) for _ in range(3)]
    assert [response.status_code for response in answers] == [200, 200, 429]
    assert answers[0].get_json()["tokens"] == [2]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
    assert answers[0].headers["x-ratelimit-remaining-requests"] == "1"
    assert [len(server.log) for server in upstreams] == [2, 2]

    # Each app counts only its own requests.
    refused = 'gateway_rate_limited_total{client="team",limit="rpm"}'
    assert (metric(one, refused), metric(two, refused)) == (1.0, 1.0)
    answered = 'gateway_requests_total{client="team",route="/tokenize",status="200"}'
    assert (metric(one, answered), metric(two, answered)) == (1.0, 2.0)
