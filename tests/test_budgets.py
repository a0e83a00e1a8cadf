"""Budgets of stored keys, and the usage kept in the database, on a real store (SQLite): tokens and requests per
day or month, refused with when they reset, crossed by a stream; what the usage counts and what it leaves out."""
import time
from datetime import datetime, timezone

import pytest

from service.policy.budgets import BudgetExceeded, check_budget
from service.store import period_end
from tests.clients import assert_openai_envelope
from tests.test_stored_keys import bearer, with_store

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
COMPLETION = {"object": "chat.completion", "choices": [],
              "usage": {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}}
ADMIN_KEY = "sk-admin-budget-test"
SETTINGS = {"OPENAI_API_KEYS": "key-a:team_a", "ADMIN_API_KEY": ADMIN_KEY}


@pytest.fixture
def gateway(make_app, httpserver, tmp_path):
    """(test client, store): a keyed gateway over the fake upstream, its keys and usage in SQLite."""
    app = make_app(httpserver.url_for("").rstrip("/"), **SETTINGS)
    store = with_store(app, f"sqlite:///{tmp_path / 'usage.db'}")
    yield app.test_client(), store
    store.close()


def post(client, headers, **fields):
    response = client.post(CHAT, json={"model": "llama", "messages": HI, **fields}, headers=headers)
    response.get_data()
    response.close()  # as a server would: the log line and its sinks (the usage)
    return response


def test_a_token_budget_refuses_once_used_up_saying_when_it_resets(gateway, httpserver):
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    client, store = gateway
    _, secret = store.keys.create("team-b", budget_tokens=60, budget_per="day")
    assert [post(client, bearer(secret)).status_code for _ in range(2)] == [200, 200]  # 50 < 60: still under
    refused = post(client, bearer(secret))
    error = assert_openai_envelope(refused, 429)
    reset = datetime.fromtimestamp(period_end("day", time.time()), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert error["code"] == "budget_exceeded"
    assert error["message"] == f"Budget exceeded for team-b: 100 of its 60 tokens per day used; it resets at {reset}"
    assert 0 < int(refused.headers["Retry-After"]) <= 86400
    assert refused.headers["x-should-retry"] == "false"  # the SDKs would resend it at once, in vain
    assert len(httpserver.log) == 2  # refused before the upstream
    assert post(client, bearer("key-a")).status_code == 200  # the environment's keys have no budget


def test_a_request_budget_in_anthropic_s_envelope(gateway, httpserver):
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    client, store = gateway
    _, secret = store.keys.create("team-c", budget_requests=1, budget_per="month")
    assert post(client, bearer(secret)).status_code == 200
    refused = client.post("/v1/messages", json={"model": "llama", "max_tokens": 5, "messages": HI},
                          headers={"x-api-key": secret, "anthropic-version": "2023-06-01"})
    body = refused.get_json()
    assert refused.status_code == 429 and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error" and "1 requests per month" in body["error"]["message"]


def test_a_stream_crosses_a_budget(gateway, httpserver):
    httpserver.expect_request(CHAT).respond_with_data(
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":70,"completion_tokens":40,"total_tokens":110}}\n\n'
        b"data: [DONE]\n\n", content_type="text/event-stream")
    client, store = gateway
    _, secret = store.keys.create("streamer", budget_tokens=100, budget_per="day")
    assert post(client, bearer(secret), stream=True).status_code == 200  # starts under the budget: runs to its end
    assert store.usage.spent(store.keys.lookup(secret).id, "day") == (110, 1)
    error = assert_openai_envelope(post(client, bearer(secret), stream=True), 429)
    assert error["code"] == "budget_exceeded" and "110 of its 100 tokens" in error["message"]


def test_usage_counts_every_admitted_api_request_and_nothing_else(gateway, httpserver):
    httpserver.expect_request(CHAT).respond_with_json(COMPLETION)
    httpserver.expect_request("/v1/models").respond_with_json({"data": [{"id": "m"}]})
    client, store = gateway
    key, secret = store.keys.create("team-d", rpm=2)
    assert [post(client, bearer(secret)).status_code for _ in range(3)] == [200, 200, 429]  # the 429: no use
    assert post(client, bearer("key-a")).status_code == 200
    assert post(client, bearer("key-a"), messages="not a list").status_code == 400  # a use, and an error
    for listing in ("/v1/models", "/models/llama"):  # no model used
        client.get(listing, headers=bearer(secret)).close()
    client.get("/v1/nowhere", headers=bearer("key-a")).close()  # no route
    client.get("/ui/api/state", headers=bearer(ADMIN_KEY)).close()  # the admin's
    client.post("/models/load", json={"model": "x"}, headers=bearer(secret)).close()  # refused, an admin route
    rows = {(row["key"], row["model"]): row for row in store.usage.query(time.time() - 3600, time.time() + 3600)}
    assert set(rows) == {(key.id, "llama-server"), ("env:team_a", "llama-server"), ("env:team_a", None)}
    used = rows[key.id, "llama-server"]
    assert (used["requests"], used["prompt_tokens"], used["completion_tokens"], used["errors"]) == (2, 60, 40, 0)
    assert (rows["env:team_a", "llama-server"]["requests"], rows["env:team_a", "llama-server"]["errors"]) == (1, 0)
    assert (rows["env:team_a", None]["requests"], rows["env:team_a", None]["errors"]) == (1, 1)  # no model named


def test_a_stream_that_fails_after_its_200_is_an_error(gateway, httpserver):
    httpserver.expect_request(CHAT).respond_with_data(
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"error":{"code":500,"message":"out of memory","type":"server_error"}}\n\n',
        content_type="text/event-stream")
    client, store = gateway
    key, secret = store.keys.create("team-e")
    assert post(client, bearer(secret), stream=True).status_code == 200
    [row] = store.usage.query(time.time() - 3600, time.time() + 3600, key=key.id)
    assert (row["requests"], row["errors"]) == (1, 1)


class FakeUsage:
    """A UsageStore's spent() and clock(), as budgets read them."""

    def __init__(self, tokens, requests, now):
        self.tokens, self.requests, self.now = tokens, requests, now

    def clock(self):
        return self.now

    def spent(self, key, per, now=None):
        return self.tokens, self.requests


def key(**fields):
    from service.store import StoredKey

    return StoredKey(id="key_0", name="team", prefix="sk-gw-ab", **fields)


def test_budget_edges_and_period_reset():
    june_30 = datetime(2025, 6, 30, 23, 59, 0, tzinfo=timezone.utc).timestamp()
    check_budget(key(), FakeUsage(10**9, 10**9, june_30))  # no budget
    check_budget(key(budget_tokens=100, budget_per="month"), FakeUsage(99, 0, june_30))
    with pytest.raises(BudgetExceeded) as caught:
        check_budget(key(budget_tokens=100, budget_per="month"), FakeUsage(100, 0, june_30))
    assert "resets at 2025-07-01T00:00:00Z" in caught.value.message
    assert caught.value.headers["Retry-After"] == "60"
    with pytest.raises(BudgetExceeded) as caught:  # a budget without a period is per month
        check_budget(key(budget_requests=5), FakeUsage(0, 5, june_30))
    assert "5 of its 5 requests per month" in caught.value.message
