"""Anthropic's Messages API end to end: the official anthropic SDK, through waitress, against the real llama.cpp,
with an API key and limits on; what the SDK sees of answers, headers, errors and token accounting."""
import anthropic
import pytest
import requests

from service.llama.supervisor import free_port
from tests.apps import DEFAULT_KEY, DEFAULT_KEY_LIMITS, routed_app
from tests.clients import ANTHROPIC_VERSION, GREEDY, HI, anthropic_sdk, assert_anthropic_envelope, reset_in
from tests.metrics_helpers import scrape, value

pytestmark = [pytest.mark.llama, pytest.mark.usefixtures("no_anthropic_environment")]


@pytest.fixture
def gateway(make_app, llama, live_gateway):
    """Start the keyed, limited gateway in front of the real llama.cpp; return (app, base URL)."""
    def start(**settings):
        app = make_app(llama.url, **{**DEFAULT_KEY_LIMITS, **settings})
        return app, live_gateway(app)
    return start


# --- answers ---

def test_create_answers_with_usage_headers_and_counted_tokens(gateway, llama, access_log):
    app, base = gateway()
    # The same prompt straight to llama.cpp first: it then reports most of it as cache_read_input_tokens.
    requests.post(llama.url + "/v1/messages", json={"messages": HI, "max_tokens": 1}, timeout=30).raise_for_status()
    raw = anthropic_sdk(base).messages.with_raw_response.create(model="demo", messages=HI, max_tokens=3, **GREEDY)
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and isinstance(message.content[0].text, str)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3
    assert message.usage.cache_read_input_tokens > 0 and message.usage.input_tokens > 0
    prompt = message.usage.input_tokens + message.usage.cache_read_input_tokens
    headers = raw.headers
    assert headers["request-id"] == headers["x-request-id"] == raw.request_id
    assert headers["anthropic-ratelimit-requests-limit"] == "50"
    assert headers["anthropic-ratelimit-requests-remaining"] == "49"
    # Whole seconds, taken when the request came in: up to a second early, and older by the time it is read.
    assert 55 <= reset_in(headers["anthropic-ratelimit-requests-reset"]) <= 61  # whole seconds, rounded up
    assert headers["anthropic-ratelimit-tokens-limit"] == "100000"
    assert headers["anthropic-ratelimit-tokens-remaining"] == "100000"  # nothing spent before this request
    assert reset_in(headers["anthropic-ratelimit-tokens-reset"]) <= 1  # nothing to wait for (rounded up)
    assert not any(name.startswith("x-ratelimit-") for name in headers)  # OpenAI's are for OpenAI's routes
    [line] = access_log.wait(1)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (prompt, 3)
    assert line["request_id"] == raw.request_id and line["client_id"] == "default"
    samples = scrape(app.test_client())
    assert value(samples, "gateway_tokens_total", client="default", kind="prompt") == prompt
    assert value(samples, "gateway_tokens_total", client="default", kind="completion") == 3
    # The next answer shows the tokens spent.
    headers = anthropic_sdk(base).messages.with_raw_response.count_tokens(model="demo", messages=HI).headers
    assert headers["anthropic-ratelimit-tokens-remaining"] == str(100000 - prompt - 3)


def test_count_tokens_counts_the_prompt_a_message_uses(gateway):
    _, base = gateway()
    client = anthropic_sdk(base)
    counted = client.messages.count_tokens(model="demo", messages=HI, system="Be brief.")
    message = client.messages.create(model="demo", messages=HI, system="Be brief.", max_tokens=1)
    assert counted.input_tokens == message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 0


def test_the_anthropic_version_header_is_accepted(gateway):
    _, base = gateway()
    answer = requests.post(base + "/v1/messages", headers={"x-api-key": DEFAULT_KEY, **ANTHROPIC_VERSION}, timeout=30,
                           json={"model": "demo", "messages": HI, "max_tokens": 1})
    assert answer.status_code == 200 and answer.json()["type"] == "message"
    assert answer.headers["request-id"] == answer.headers["x-request-id"]


def test_tokens_spent_by_answers_exhaust_the_tpm_limit(gateway, access_log):
    _, base = gateway(RATE_LIMIT_TPM="20")  # one answer's prompt alone is more
    client = anthropic_sdk(base)
    client.messages.create(model="demo", messages=HI, max_tokens=1)
    access_log.wait(1)  # its tokens are counted when its answer has been sent
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.count_tokens(model="demo", messages=HI)
    assert_anthropic_envelope(caught.value, "rate_limit_error", "tokens per minute")
    assert caught.value.response.headers["anthropic-ratelimit-tokens-remaining"] == "0"
    assert int(caught.value.response.headers["retry-after"]) >= 1


# --- errors, as the SDK's exception classes ---

@pytest.mark.parametrize("body, field", [
    # Any role word passes (Claude Code sends "system" in messages), but llama.cpp answers a 500 for a number.
    ({"messages": [{"role": 5, "content": "hi"}], "max_tokens": 1}, "messages[0].role"),
    ({"messages": HI, "max_tokens": anthropic.omit}, "max_tokens"),
    ({"messages": "hi", "max_tokens": 1}, "messages"),
    ({"messages": HI, "max_tokens": 1, "tools": [{"description": "d", "input_schema": {"type": "object"}}]},
     "tools[0].name"),
    # llama.cpp would answer these with a 500 ("key 'text' not found"), or a 200 Anthropic refuses.
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}], "max_tokens": 1}, "messages[0].content[0].text"),
    ({"messages": [], "max_tokens": 1}, "messages"),
], ids=["role not a string", "no max_tokens", "messages not a list", "tool without name", "text block without text",
        "no messages"])
def test_invalid_bodies_raise_bad_request_naming_the_field_and_never_reach_llama_cpp(
        make_app, live_gateway, httpserver, body, field):
    # An upstream that would take anything: only the gateway can refuse these.
    httpserver.expect_request("/v1/messages").respond_with_json({"type": "message"})
    base = live_gateway(make_app(httpserver.url_for("").rstrip("/"), **DEFAULT_KEY_LIMITS))
    with pytest.raises(anthropic.BadRequestError) as caught:
        anthropic_sdk(base).messages.create(model="demo", **body)
    assert caught.value.status_code == 400
    assert_anthropic_envelope(caught.value, "invalid_request_error", f"'{field}'")
    assert caught.value.request_id == caught.value.response.headers["x-request-id"]
    assert httpserver.log == []


# This SDK sends api_key as Authorization: Bearer (as it does auth_token); x-api-key is what curl users and older
# SDKs send: the gateway takes either.
CREDENTIALS = {
    "x-api-key": lambda key: {"api_key": None, "default_headers": {"x-api-key": key}},
    "api_key": lambda key: {"api_key": key},
    "auth_token": lambda key: {"api_key": None, "auth_token": key},
}


@pytest.mark.parametrize("credentials", CREDENTIALS.values(), ids=CREDENTIALS.keys())
def test_a_wrong_key_raises_authentication_error(gateway, credentials):
    _, base = gateway()
    client = anthropic.Anthropic(base_url=base, max_retries=0, timeout=30, **credentials("wrong"))
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(model="demo", messages=HI, max_tokens=1)
    assert caught.value.status_code == 401
    assert_anthropic_envelope(caught.value, "authentication_error", "Incorrect API key")
    assert caught.value.request_id == caught.value.response.headers["x-request-id"]


@pytest.mark.parametrize("credentials", CREDENTIALS.values(), ids=CREDENTIALS.keys())
def test_the_right_key_is_let_in_however_it_is_sent(gateway, credentials):
    _, base = gateway()
    client = anthropic.Anthropic(base_url=base, max_retries=0, timeout=30, **credentials(DEFAULT_KEY))
    assert client.messages.count_tokens(model="demo", messages=HI).input_tokens > 0


def test_an_unknown_model_raises_not_found_where_the_gateway_routes_by_model(make_app, live_gateway, llama):
    base = live_gateway(routed_app(make_app, {"small": [llama.url], "smaller": [llama.url]}, **DEFAULT_KEY_LIMITS))
    client = anthropic_sdk(base)
    assert client.messages.create(model="small", messages=HI, max_tokens=1).model == "small"
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="claude-opus", messages=HI, max_tokens=1)
    assert_anthropic_envelope(caught.value, "not_found_error", "claude-opus")


def test_requests_past_the_rpm_limit_raise_rate_limit_error(gateway):
    _, base = gateway(RATE_LIMIT_RPM="2")
    client = anthropic_sdk(base)
    for _ in range(2):
        client.messages.count_tokens(model="demo", messages=HI)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="demo", messages=HI, max_tokens=1)
    headers = caught.value.response.headers
    assert caught.value.status_code == 429 and int(headers["retry-after"]) >= 1
    assert_anthropic_envelope(caught.value, "rate_limit_error", "requests per minute", "RATE_LIMIT_RPM")
    assert headers["anthropic-ratelimit-requests-limit"] == "2"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert 0 < reset_in(headers["anthropic-ratelimit-requests-reset"]) <= 61  # whole seconds, rounded up
    assert caught.value.request_id == headers["x-request-id"]


def test_llama_cpp_unreachable_is_overloaded(make_app, live_gateway):
    base = live_gateway(make_app(f"http://127.0.0.1:{free_port()}", **DEFAULT_KEY_LIMITS))  # nothing listens there
    with pytest.raises(anthropic.InternalServerError) as caught:
        anthropic_sdk(base).messages.create(model="demo", messages=HI, max_tokens=1)
    assert isinstance(caught.value, anthropic.OverloadedError) and caught.value.status_code == 529
    assert_anthropic_envelope(caught.value, "overloaded_error")
    assert caught.value.request_id == caught.value.response.headers["x-request-id"]


def test_an_unknown_route_answers_in_anthropics_envelope_for_an_anthropic_client(gateway):
    _, base = gateway()
    with pytest.raises(anthropic.NotFoundError) as caught:
        anthropic_sdk(base).get("/v1/messages/batches/nothing", cast_to=object)  # the SDK sends anthropic-version
    assert_anthropic_envelope(caught.value, "not_found_error", "/v1/messages/batches/nothing")


def test_a_wrong_method_on_messages_answers_405_in_anthropics_envelope(gateway):
    _, base = gateway()
    answer = requests.get(base + "/v1/messages", headers={"x-api-key": DEFAULT_KEY}, timeout=30)  # no anthropic-version
    assert answer.status_code == 405 and "POST" in answer.headers["Allow"]
    body = answer.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "use POST" in body["error"]["message"]
