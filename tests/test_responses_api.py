"""OpenAI's Responses API (POST /v1/responses) and GET /v1/models/{model}, with the official openai SDK through
waitress, with a key and limits on: against the real llama.cpp for answers, streams, the SDK's stream helper,
token counting and routing by model; against fakes for a stream that breaks."""
import openai
import pytest
from openai.types.responses import ResponseErrorEvent
from werkzeug import Response

from tests.apps import TEAM_ID, TEAM_KEY_SETTINGS, routed_app
from tests.clients import openai_sdk, request_id_header
from tests.fakes import SSE_HEAD, BrokenPeer, chunk
from tests.metrics_helpers import scrape, value

# The random demo model may stop early, or say only bytes that are no text: llama.cpp then streams no event but
# response.completed (2 streams in 300, measured). Letters only, and no stopping before max_output_tokens.
EXACT = {"ignore_eos": True, "grammar": "root ::= [a-z ]+"}
# The events of one output item, and of one content part of it: the SDK's models of these carry the indexes.
ITEM_EVENTS = ("response.output_item.", "response.content_part.", "response.output_text.")
PART_EVENTS = ("response.content_part.", "response.output_text.")


@pytest.fixture
def keyed_llama(make_app, live_gateway, llama):
    """(app, openai client) of a keyed, limited gateway in front of the real llama.cpp (one model, any name)."""
    app = make_app(llama.url, **TEAM_KEY_SETTINGS)
    client = openai_sdk(live_gateway(app))
    yield app, client
    client.close()


@pytest.fixture
def two_models(make_app, live_gateway, llama, other_llama):
    """(app, openai client) of a keyed gateway routing "small" and "smaller" to two real llama.cpp servers."""
    app = routed_app(make_app, {"small": [llama.url], "smaller": [other_llama.url]}, **TEAM_KEY_SETTINGS)
    client = openai_sdk(live_gateway(app))
    yield app, client
    client.close()


def check_sequence_and_indexes(events):
    """Every event numbered in order from 0; every item and content event with the indexes the SDK needs."""
    assert [event.sequence_number for event in events] == list(range(len(events)))
    for event in events:
        if event.type.startswith(ITEM_EVENTS):
            assert event.output_index == 0, event
        if event.type.startswith(PART_EVENTS):
            assert event.content_index == 0, event


# --- answers and streams from the real llama.cpp ---

@pytest.mark.llama
def test_create_answers_text_with_usage_and_counts_it(keyed_llama, access_log):
    app, client = keyed_llama
    raw = client.responses.with_raw_response.create(model="llama", input="Say hello", max_output_tokens=4,
                                                    extra_body=EXACT, extra_headers=request_id_header("resp-create"))
    answer = raw.parse()
    assert raw.headers["x-request-id"] == "resp-create" and raw.headers["x-ratelimit-limit-tokens"] == "1000000"
    assert answer.object == "response" and answer.status == "completed"
    assert isinstance(answer.output_text, str) and answer.output[0].content[0].type == "output_text"
    assert answer.usage.output_tokens == 4 and answer.usage.input_tokens > 0
    line = access_log.line("resp-create")
    assert (line["path"], line["status"], line["client_id"]) == ("/v1/responses", 200, TEAM_ID)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (answer.usage.input_tokens, 4)
    samples = scrape(app.test_client())
    assert value(samples, "gateway_tokens_total", client=TEAM_ID, kind="completion") == 4
    assert value(samples, "gateway_tokens_total", client=TEAM_ID, kind="prompt") == answer.usage.input_tokens


@pytest.mark.llama
def test_raw_stream_numbers_its_events_and_its_usage_is_counted(keyed_llama, access_log):
    app, client = keyed_llama
    events = list(client.responses.create(model="llama", input="Say hello", max_output_tokens=5, stream=True,
                                          extra_body=EXACT, extra_headers=request_id_header("resp-stream")))
    check_sequence_and_indexes(events)
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert {"response.output_item.added", "response.content_part.added", "response.output_text.delta",
            "response.output_text.done", "response.output_item.done"} <= set(kinds)
    done = next(event for event in events if event.type == "response.output_text.done")
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == done.text
    usage = events[-1].response.usage
    assert usage.output_tokens == 5 and usage.input_tokens > 0
    # Counted from response.completed: the log line and the metrics say what the SDK was told.
    line = access_log.line("resp-stream")
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage.input_tokens, usage.output_tokens)
    assert line["status"] == 200 and "error" not in line and line["ttft_ms"] > 0
    samples = scrape(app.test_client())
    assert value(samples, "gateway_tokens_total", client=TEAM_ID, kind="prompt") == usage.input_tokens
    assert value(samples, "gateway_tokens_total", client=TEAM_ID, kind="completion") == usage.output_tokens


@pytest.mark.llama
def test_the_sdks_stream_helper_works_to_the_final_response(keyed_llama):
    _, client = keyed_llama
    with client.responses.stream(model="llama", input="Say hello", max_output_tokens=5, extra_body=EXACT) as stream:
        events = list(stream)  # the helper raises on a content event without its indexes
        final = stream.get_final_response()
    check_sequence_and_indexes(events)
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert deltas and deltas[-1].snapshot == "".join(event.delta for event in deltas)  # built by the helper
    assert final.output_text == deltas[-1].snapshot
    assert final.status == "completed" and final.usage.output_tokens == 5


@pytest.mark.llama
def test_the_route_without_v1_answers_too(keyed_llama):
    _, client = keyed_llama
    root = client.with_options(base_url=str(client.base_url).removesuffix("v1/"))
    assert root.responses.create(model="llama", input="hi", max_output_tokens=1).status == "completed"


@pytest.mark.llama
def test_what_openai_allows_and_llama_cpp_does_too_passes(keyed_llama):
    _, client = keyed_llama
    answer = client.responses.create(model="llama", input=[{"role": "user", "content": "hi"}], store=False,
                                     instructions="Be brief.", max_output_tokens=1, extra_body=EXACT)
    assert answer.status == "completed" and answer.usage.output_tokens == 1
    with pytest.raises(openai.BadRequestError) as too_long:
        client.responses.create(model="llama", input="a " * 5000, max_output_tokens=1)
    assert too_long.value.code == "context_length_exceeded"  # llama.cpp's own 400, in OpenAI's envelope


@pytest.mark.parametrize("fields, param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"conversation": "conv_123"}, "conversation"),
    ({"input": []}, "input"),
    ({"input": [{"role": 5, "content": "hi"}]}, "input[0].role"),
    # llama.cpp answers a 500 for a function tool whose description is not a string.
    ({"tools": [{"type": "function", "name": "f", "description": None}]}, "tools[0].description"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_what_llama_cpp_cannot_do_is_a_400_naming_the_param(make_app, live_gateway, httpserver, fields, param):
    # The fake upstream expects nothing: a refused request never reaches llama.cpp.
    client = openai_sdk(live_gateway(make_app(httpserver.url_for("").rstrip("/"), **TEAM_KEY_SETTINGS)))
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**{"model": "llama", "input": "hi", **fields})
    assert refused.value.param == param and refused.value.type == "invalid_request_error"
    assert refused.value.message
    assert httpserver.log == []


# --- GET /v1/models/{model} ---

@pytest.mark.llama
def test_retrieve_any_model_name_with_one_llama_server(keyed_llama):
    _, client = keyed_llama
    model = client.models.retrieve("gpt-4o-mini")
    assert (model.id, model.object, model.owned_by) == ("gpt-4o-mini", "model", "llamacpp")
    root = client.with_options(base_url=str(client.base_url).removesuffix("v1/"))  # GET /models/{model}
    assert root.models.retrieve("meta-llama/Llama-3.1-8B").id == "meta-llama/Llama-3.1-8B"  # a name with a /


@pytest.mark.llama
def test_retrieve_a_routed_model_and_an_unknown_one(two_models):
    _, client = two_models
    model = client.models.retrieve("smaller")
    assert (model.id, model.object) == ("smaller", "model")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("nope")
    assert unknown.value.code == "model_not_found"


# --- routing by model ---

@pytest.mark.llama
def test_the_clients_model_name_comes_back_in_answers_and_stream_events(two_models, access_log):
    _, client = two_models
    for name in ("small", "smaller"):
        assert client.responses.create(model=name, input="hi", max_output_tokens=2).model == name
    events = list(client.responses.create(model="smaller", input="hi", max_output_tokens=3, stream=True,
                                          extra_body=EXACT, extra_headers=request_id_header("resp-routed")))
    check_sequence_and_indexes(events)
    models = [event.response.model for event in events if getattr(getattr(event, "response", None), "model", None)]
    assert models and set(models) == {"smaller"}  # llama.cpp calls it "other"
    assert events[-1].type == "response.completed" and events[-1].response.model == "smaller"
    assert access_log.line("resp-routed")["model"] == "smaller"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model="nope", input="hi")
    assert unknown.value.code == "model_not_found"


# --- the token limit ---

@pytest.mark.llama
def test_the_token_limit_refuses_once_a_stream_has_spent_it(make_app, live_gateway, llama, access_log):
    app = make_app(llama.url, **{**TEAM_KEY_SETTINGS, "RATE_LIMIT_TPM": "20"})
    client = openai_sdk(live_gateway(app))
    stream = client.responses.create(model="llama", input="hi", max_output_tokens=2, stream=True,
                                     extra_headers=request_id_header("resp-spend"))
    usage = [event for event in stream][-1].response.usage
    assert usage.input_tokens + usage.output_tokens > 20  # admitted before it spent the limit
    access_log.line("resp-spend")  # the tokens are counted when the stream has ended
    with pytest.raises(openai.RateLimitError) as refused:
        client.responses.create(model="llama", input="hi", max_output_tokens=2, stream=True,
                                extra_headers=request_id_header("resp-refused"))
    assert refused.value.code == "rate_limit_exceeded" and "token" in refused.value.message
    assert access_log.line("resp-refused")["status"] == 429  # its metrics are taken just before its line
    assert value(scrape(app.test_client()), "gateway_rate_limited_total", client=TEAM_ID, limit="tpm") == 1


# --- streams that break ---

CREATED = (b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1",'
           b'"object":"response","status":"in_progress"}}\n\n')
ITEM_ADDED = (b'event: response.output_item.added\ndata: {"type":"response.output_item.added","item":'
              b'{"content":[],"id":"msg_1","role":"assistant","status":"in_progress","type":"message"}}\n\n')
PART_ADDED = (b'event: response.content_part.added\ndata: {"type":"response.content_part.added",'
              b'"item_id":"msg_1","part":{"type":"output_text","text":""}}\n\n')
DELTA = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","item_id":"msg_1",'
         b'"delta":"Hel"}\n\n')
BEGUN = CREATED + ITEM_ADDED + PART_ADDED + DELTA


def broken_after(begun: bytes):
    """A BrokenPeer script: a Responses stream that sends begun, then resets the connection."""
    def script(peer, conn):
        conn.sendall(SSE_HEAD + chunk(begun))
        peer.reset(conn)
    return script


@pytest.fixture
def broken_gateway(make_app, live_gateway):
    """An openai client of a keyed gateway whose upstream breaks every Responses stream after four events."""
    peer = BrokenPeer(broken_after(BEGUN))
    client = openai_sdk(live_gateway(make_app(peer.url, **TEAM_KEY_SETTINGS)))
    yield client
    client.close()
    peer.close()


def test_a_broken_stream_ends_with_the_responses_error_event(broken_gateway, access_log):
    events = list(broken_gateway.responses.create(model="llama", input="hi", stream=True,
                                                  extra_headers=request_id_header("resp-broken")))
    # The SDK does not raise on the Responses API's error event: it yields it, typed.
    *begun, error = events
    assert [event.type for event in begun] == ["response.created", "response.output_item.added",
                                               "response.content_part.added", "response.output_text.delta"]
    assert isinstance(error, ResponseErrorEvent) and error.type == "error"
    assert error.code == "upstream_bad_response" and error.param is None
    assert error.message == "llama-server broke off the stream: connection reset"
    check_sequence_and_indexes(events[:-1])
    assert error.sequence_number == len(begun)
    line = access_log.line("resp-broken")
    assert line["status"] == 200 and line["error"] == "upstream_bad_response"


def test_the_stream_helper_yields_the_error_event_and_has_no_final_response(broken_gateway):
    with broken_gateway.responses.stream(model="llama", input="hi") as stream:
        events = list(stream)
        assert isinstance(events[-1], ResponseErrorEvent) and events[-1].code == "upstream_bad_response"
        assert events[-2].type == "response.output_text.delta" and events[-2].snapshot == "Hel"
        with pytest.raises(RuntimeError, match="response.completed"):
            stream.get_final_response()


OOM = b'{"error":{"code":500,"message":"llama.cpp ran out of memory","type":"server_error"}}'


@pytest.mark.parametrize("report", [b"event: error\ndata: " + OOM + b"\n\n", b"data: " + OOM + b"\n\n"],
                         ids=["error event", "data event"])
def test_llama_cpps_error_report_mid_stream_becomes_the_responses_error_event(make_app, live_gateway, httpserver,
                                                                              access_log, report):
    httpserver.expect_request("/v1/responses").respond_with_handler(
        lambda request: Response([BEGUN + report], content_type="text/event-stream"))
    client = openai_sdk(live_gateway(make_app(httpserver.url_for("").rstrip("/"), **TEAM_KEY_SETTINGS)))
    events = list(client.responses.create(model="llama", input="hi", stream=True,
                                          extra_headers=request_id_header("resp-oom")))
    assert [event.type for event in events] == ["response.created", "response.output_item.added",
                                                "response.content_part.added", "response.output_text.delta", "error"]
    assert events[-1].message == "llama-server failed mid-stream: llama.cpp ran out of memory"
    assert events[-1].sequence_number == 4
    assert access_log.line("resp-oom")["error"] == "upstream_error"


def test_text_that_mentions_an_error_is_relayed_as_text(make_app, live_gateway, httpserver, access_log):
    said = DELTA.replace(b'"Hel"', b'"error: \\"error\\""')
    completed = (b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"resp_1",'
                 b'"object":"response","status":"completed","model":"m","output":[],'
                 b'"usage":{"input_tokens":3,"output_tokens":1,"total_tokens":4}}}\n\n')
    httpserver.expect_request("/v1/responses").respond_with_handler(
        lambda request: Response([CREATED + ITEM_ADDED + PART_ADDED + said + completed],
                                 content_type="text/event-stream"))
    app = make_app(httpserver.url_for("").rstrip("/"), **TEAM_KEY_SETTINGS)
    events = list(openai_sdk(live_gateway(app)).responses.create(model="llama", input="hi", stream=True,
                                                                 extra_headers=request_id_header("resp-talk")))
    assert [event.type for event in events][-2:] == ["response.output_text.delta", "response.completed"]
    assert events[-2].delta == 'error: "error"'
    line = access_log.line("resp-talk")
    assert "error" not in line and (line["prompt_tokens"], line["completion_tokens"]) == (3, 1)
