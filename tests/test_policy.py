"""The access policy around every request: limits before the upstream, rate-limit headers, request ids, CORS."""
import json
import socket
import threading
from urllib.parse import urlsplit

import pytest
import requests

from tests.fakes import gated_stream
from tests.clients import assert_openai_envelope

CHAT = "/v1/chat/completions"
CHAT_BODY = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"object": "chat.completion", "choices": [],
              "usage": {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}}
KEYS = {"OPENAI_API_KEYS": "key-a:team_a,key-b:team_b"}
TEAM_A = {"Authorization": "Bearer key-a"}
TEAM_B = {"Authorization": "Bearer key-b"}


@pytest.fixture
def limited(make_app, httpserver):
    """A keyed gateway over a fake upstream; call it with the limit settings."""
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)

    def build(**settings):
        return make_app(httpserver.url_for("").rstrip("/"), **KEYS, **settings).test_client()
    return build


def post(client, headers):
    response = client.post(CHAT, json=CHAT_BODY, headers=headers)
    response.close()  # as a server would: frees the in-flight slot and counts the tokens
    return response


def test_rpm_limit_is_per_client_and_never_reaches_upstream(limited, httpserver):
    client = limited(RATE_LIMIT_RPM="2")
    assert [post(client, TEAM_A).status_code for _ in range(2)] == [200, 200]
    response = post(client, TEAM_A)
    error = assert_openai_envelope(response, 429)
    assert error["code"] == "rate_limit_exceeded" and "2 requests per minute" in error["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert post(client, TEAM_B).status_code == 200  # another client is unaffected
    assert len(httpserver.log) == 3


def test_per_client_overrides(limited):
    client = limited(RATE_LIMIT_RPM="1", RATE_LIMITS="team_b:rpm=3")
    assert [post(client, TEAM_A).status_code for _ in range(2)] == [200, 429]
    assert [post(client, TEAM_B).status_code for _ in range(4)] == [200, 200, 200, 429]


def test_keys_of_one_client_share_its_limits(make_app, httpserver):
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    client = make_app(httpserver.url_for("").rstrip("/"), OPENAI_API_KEYS="key-1:team,key-2:team",
                      RATE_LIMIT_RPM="2").test_client()
    key_1, key_2 = {"Authorization": "Bearer key-1"}, {"x-api-key": "key-2"}
    first, second = post(client, key_1), post(client, key_2)
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.headers["x-ratelimit-remaining-requests"] == "0"  # key-2's request counted after key-1's
    for headers in (key_1, key_2):  # the client's two requests are used up, whichever key asks
        error = assert_openai_envelope(post(client, headers), 429)
        assert error["message"].startswith("Rate limit reached for team:")
    assert len(httpserver.log) == 2


def test_open_access_callers_share_the_anonymous_limits(make_app, httpserver):
    # With no key configured every caller is the one client "anonymous", whatever it sends or wherever it is.
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    client = make_app(httpserver.url_for("").rstrip("/"), RATE_LIMIT_RPM="2").test_client()
    callers = [({}, "10.0.0.1"), ({"Authorization": "Bearer caller-2"}, "10.0.0.2"),
               ({"x-api-key": "caller-3"}, "10.0.0.3"), ({"x-request-id": "caller-4"}, "10.0.0.4")]
    answers = []
    for headers, address in callers:
        response = client.post(CHAT, json=CHAT_BODY, headers=headers, environ_base={"REMOTE_ADDR": address})
        response.close()
        answers.append(response)
    assert [response.status_code for response in answers] == [200, 200, 429, 429]
    assert answers[1].headers["x-ratelimit-remaining-requests"] == "0"
    for refused in answers[2:]:
        assert assert_openai_envelope(refused, 429)["message"].startswith("Rate limit reached for anonymous:")
    assert len(httpserver.log) == 2


def test_model_listings_need_a_key_but_count_against_no_limit(limited, httpserver):
    # Clients probe /v1/models at start (and some before every request): it must not eat their requests per minute.
    httpserver.expect_request("/v1/models").respond_with_json({"object": "list", "data": [{"id": "llama",
                                                                                          "object": "model"}]})
    client = limited(RATE_LIMIT_RPM="1", RATE_LIMIT_CONCURRENT="1")
    for path in ("/v1/models", "/models", "/v1/models/llama", "/v1/models", "/models/llama"):
        response = client.get(path, headers=TEAM_A)
        assert response.status_code == 200, path
        assert "x-ratelimit-remaining-requests" not in response.headers  # not counted: no standing to show
    assert_openai_envelope(client.get("/v1/models"), 401)  # still behind the key
    assert [post(client, TEAM_A).status_code for _ in range(2)] == [200, 429]  # the one request was left whole
    assert client.get("/v1/models", headers=TEAM_A).status_code == 200  # and past the limit, still listed


def test_tpm_counts_usage_from_answers(limited):
    client = limited(RATE_LIMIT_TPM="100")
    first = post(client, TEAM_A)
    assert first.headers["x-ratelimit-limit-tokens"] == "100"
    assert first.headers["x-ratelimit-remaining-tokens"] == "100"
    assert post(client, TEAM_A).headers["x-ratelimit-remaining-tokens"] == "50"
    error = assert_openai_envelope(post(client, TEAM_A), 429)
    assert "100 tokens per minute" in error["message"]


def test_rate_limit_headers_on_every_authenticated_response(limited):
    client = limited(RATE_LIMIT_RPM="10")
    response = post(client, TEAM_A)
    assert response.headers["x-ratelimit-limit-requests"] == "10"
    assert response.headers["x-ratelimit-remaining-requests"] == "9"
    assert response.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "x-ratelimit-limit-tokens" not in response.headers  # no token limit, no token headers
    bad = client.post(CHAT, json={}, headers=TEAM_A)  # a 400 is still an authenticated response
    assert bad.headers["x-ratelimit-remaining-requests"] == "8"


def test_concurrency_limit_holds_until_the_stream_ends(make_app, httpserver, live_gateway):
    release = threading.Event()
    httpserver.expect_request(CHAT).respond_with_handler(
        gated_stream(b'data: {"choices":[]}\n\n', b"data: [DONE]\n\n", release))
    httpserver.expect_request("/tokenize").respond_with_json({"tokens": [1]})
    base = live_gateway(make_app(httpserver.url_for("").rstrip("/"), **KEYS, RATE_LIMIT_CONCURRENT="1"), threads=4)
    stream = requests.post(base + CHAT, json={**CHAT_BODY, "stream": True}, headers=TEAM_A, stream=True, timeout=10)
    try:
        assert stream.status_code == 200
        next(stream.iter_content(None))
        second = requests.post(base + CHAT, json=CHAT_BODY, headers=TEAM_A, timeout=10)
        assert second.status_code == 429
        assert "1 requests in flight" in second.json()["error"]["message"]
        assert second.headers["Retry-After"] == "1"
    finally:
        release.set()
        stream.close()
    for _ in range(100):  # the slot frees as soon as waitress has closed the finished stream
        # A request the limits count: a model listing would pass with the slot still held.
        status = requests.post(base + "/tokenize", json={"content": "hi"}, headers=TEAM_A, timeout=10).status_code
        if status != 429:
            break
    assert status == 200


@pytest.mark.parametrize("incoming, kept", [
    ("abc-123", True), ("req:1.2_3-x", True), ("x" * 128, True),
    ("x" * 129, False), ("has space", False), ("semi;colon", False), ("", False), ("ünïcode", False),
])
def test_request_id_kept_if_sane(fake_client, httpserver, incoming, kept):
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    headers = {"x-request-id": incoming.encode("utf-8").decode("latin-1")}
    response = fake_client.post(CHAT, json=CHAT_BODY, headers=headers)
    echoed = response.headers["x-request-id"]
    assert (echoed == incoming) is kept
    if not kept:
        assert len(echoed) == 32 and all(c in "0123456789abcdef" for c in echoed)
    assert httpserver.log[0][0].headers["X-Request-Id"] == echoed  # forwarded to llama-server


def test_request_id_on_errors_and_streams(fake_client, httpserver):
    assert fake_client.get("/v1/nope", headers={"x-request-id": "r-404"}).headers["x-request-id"] == "r-404"
    assert fake_client.post(CHAT, data=b"{", headers={"x-request-id": "r-400"}).headers["x-request-id"] == "r-400"
    httpserver.expect_request(CHAT).respond_with_data(b"data: [DONE]\n\n", content_type="text/event-stream")
    stream = fake_client.post(CHAT, json={**CHAT_BODY, "stream": True}, headers={"x-request-id": "r-sse"})
    assert stream.headers["x-request-id"] == "r-sse"


def test_cors_allowed_and_disallowed_origins(make_app, httpserver):
    client = make_app(httpserver.url_for("").rstrip("/"), **KEYS,
                      CORS_ORIGINS="https://app.example.com,http://localhost:3000").test_client()
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type,x-request-id"}
    allowed = client.options(CHAT, headers={"Origin": "https://app.example.com", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    assert {"authorization", "content-type", "x-request-id"} <= {
        h.strip().lower() for h in allowed.headers["Access-Control-Allow-Headers"].split(",")}
    other = client.options(CHAT, headers={"Origin": "https://evil.example.net", **preflight})
    assert "Access-Control-Allow-Origin" not in other.headers
    httpserver.expect_request("/v1/models").respond_with_json({"data": [{"id": "m"}]})
    actual = client.get("/v1/models", headers={"Origin": "http://localhost:3000", **TEAM_A})
    exposed = {h.strip().lower() for h in actual.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-request-id", "x-ratelimit-remaining-requests", "x-ratelimit-reset-tokens"} <= exposed


def test_no_cors_origins_means_no_cors_headers(fake_client):
    response = fake_client.options(CHAT, headers={"Origin": "https://app.example.com",
                                                  "Access-Control-Request-Method": "POST"})
    assert not [name for name in response.headers.keys() if name.lower().startswith("access-control")]


def test_oversized_body_is_refused_before_it_is_read(make_app, httpserver, live_gateway):
    base = live_gateway(make_app(httpserver.url_for("").rstrip("/"), MAX_BODY_BYTES="1000"))
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as conn:
        # Announce 50 MB and send none of it: the answer must come at once, from the headers alone.
        conn.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50000000\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            more = conn.recv(65536)
            if not more:
                break
            answer += more
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"application/json" in head
    error = json.loads(body)["error"]
    assert "MAX_BODY_BYTES" in error["message"] and "1000" in error["message"]
    assert httpserver.log == []


def test_oversized_body_without_length_gets_the_envelope_too(make_app, httpserver, live_gateway):
    base = live_gateway(make_app(httpserver.url_for("").rstrip("/"), MAX_BODY_BYTES="1000"))
    chunks = (b'{"input": "' + b"x" * 500 + b'"' for _ in range(4))
    response = requests.post(base + "/v1/embeddings", data=chunks, headers={"Content-Type": "application/json"},
                             timeout=10)
    assert response.status_code == 413
    assert "MAX_BODY_BYTES" in response.json()["error"]["message"]
