"""The access policy end to end: three keys, three clients, a real llama.cpp, and the openai SDK."""
import json
import time

import openai
import pytest
import requests

pytestmark = pytest.mark.llama

KEYS = "key-a-111:team_a,key-b-222:team_b,key-c-333"
USER = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def gateway(make_app, llama, live_gateway):
    """Start a keyed gateway in front of the real llama.cpp with the given limits; return its base URL."""
    def start(**settings):
        return live_gateway(make_app(llama.url, OPENAI_API_KEYS=KEYS, **settings))
    return start


def sdk(base, key, retries=0):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=retries, timeout=30)


def test_one_client_limited_while_the_others_are_not(gateway):
    base = gateway(RATE_LIMITS="team_a:rpm=2")
    team_a, team_b, team_c = sdk(base, "key-a-111"), sdk(base, "key-b-222"), sdk(base, "key-c-333")
    for _ in range(2):
        team_a.completions.create(model="llama", prompt="hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as caught:
        team_a.completions.create(model="llama", prompt="hi", max_tokens=1)
    assert caught.value.body["code"] == "rate_limit_exceeded"
    assert caught.value.response.headers["x-request-id"] == caught.value.request_id
    for client in (team_b, team_c):
        for _ in range(3):
            assert client.completions.create(model="llama", prompt="hi", max_tokens=1).choices


def test_wrong_key_raises_authentication_error(gateway):
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(gateway(), "key-a-11").models.list()
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"


def test_sdk_waits_out_retry_after_and_succeeds(gateway):
    base = gateway(RATE_LIMIT_RPM="1", RATE_LIMIT_WINDOW_S=2.0)
    client = sdk(base, "key-b-222", retries=2)
    client.completions.create(model="llama", prompt="hi", max_tokens=1)  # a request that counts (listings do not)
    started = time.monotonic()
    # 429 with Retry-After: 2, then the SDK's retry gets through
    assert client.completions.create(model="llama", prompt="hi", max_tokens=1).choices
    assert time.monotonic() - started >= 1.0


def stream_events(base, key, **extra):
    response = requests.post(base + "/v1/chat/completions", timeout=30, stream=True,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"messages": USER, "max_tokens": 4, "ignore_eos": True, "stream": True, **extra})
    events = [e[len(b"data: "):] for e in response.content.split(b"\n\n") if e.startswith(b"data: ")]
    return response, events


def remaining_tokens(base, key, below=None):
    """x-ratelimit-remaining-tokens; with below, wait until the last request's tokens are counted (on close)."""
    deadline = time.monotonic() + 5
    while True:
        # A tokenize counts against the limits (a model listing does not, so it has no such header) and reports
        # no usage, so that the probe itself spends no tokens.
        response = requests.post(base + "/tokenize", headers={"Authorization": f"Bearer {key}"},
                                 json={"content": "hi"}, timeout=30)
        remaining = int(response.headers["x-ratelimit-remaining-tokens"])
        if below is None or remaining < below or time.monotonic() > deadline:
            return remaining
        time.sleep(0.01)


def test_tokens_counted_on_streams_and_the_stream_left_as_asked(gateway, llama):
    base = gateway(RATE_LIMIT_TPM="100000")
    start = remaining_tokens(base, "key-a-111")

    response, events = stream_events(base, "key-a-111")
    assert response.headers["x-ratelimit-limit-tokens"] == "100000"  # streams carry the headers too
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["choices"] and "usage" not in chunk for chunk in chunks)  # no usage chunk: not asked for
    after_plain = remaining_tokens(base, "key-a-111", below=start)
    used = start - after_plain
    assert used > 4  # the prompt (tens of tokens with the chat template) and the 4 completion tokens

    response, events = stream_events(base, "key-a-111", stream_options={"include_usage": True})
    usage = json.loads(events[-2])["usage"]
    assert json.loads(events[-2])["choices"] == []
    assert remaining_tokens(base, "key-a-111", below=after_plain) == after_plain - usage["total_tokens"]
    assert usage["total_tokens"] == used  # the same request costs the same, seen or unseen

    # Straight from llama.cpp, the same request has no usage chunk either: the gateway changed nothing visible.
    direct = requests.post(llama.url + "/v1/chat/completions", timeout=30, json={
        "messages": USER, "max_tokens": 4, "ignore_eos": True, "stream": True})
    assert direct.content.endswith(b"data: [DONE]\n\n") and b'"usage"' not in direct.content
