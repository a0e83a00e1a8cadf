"""llama.cpp's own endpoints through the gateway (rerank, tokenize, detokenize, apply-template, infill), with a key
and limits on: against real llama.cpp servers (one started with reranking on) and against fakes for what the
demo model cannot do (a model with fill-in-the-middle tokens)."""
import json

import openai
import pytest
import requests
from werkzeug import Response

from service.llama.supervisor import LlamaSupervisor
from tests.apps import TEAM_ID, TEAM_KEY, TEAM_KEY_SETTINGS, routed_app
from tests.clients import openai_sdk, request_id_header
from tests.metrics_helpers import scrape, value

AUTH = {"Authorization": f"Bearer {TEAM_KEY}"}
DOCUMENTS = ["the cat sat on the mat", "stock prices fell", "a kitten sleeps", "rain is forecast"]
RERANK = {"model": "ranker", "query": "where is the cat", "documents": DOCUMENTS}
RERANK_ROUTES = ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking")
# A 1x1 PNG.
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5"
         "ErkJggg==")


@pytest.fixture(scope="module")
def ranker(demo_model_path):
    """A real llama.cpp started as a reranker (rank pooling) on the demo model: it then serves /v1/rerank."""
    supervisor = LlamaSupervisor(demo_model_path, ctx=1024, parallel=2, threads=1, embeddings=True, pooling="rank",
                                 alias="ranker-file", startup_timeout=60).start()
    yield supervisor
    supervisor.stop()


def gateway(make_app, live_gateway, upstream_url, **settings):
    """(app, base URL) of a keyed, limited gateway in front of upstream_url, served by waitress."""
    app = make_app(upstream_url, **{**TEAM_KEY_SETTINGS, **settings})
    return app, live_gateway(app)


def post(base, path, body, **headers):
    """POST body to path on the gateway with the key; return the response."""
    return requests.post(base + path, json=body, headers={**AUTH, **headers}, timeout=30)


def check_ranking(answer, documents, top_n=None):
    """results: top_n (else all) documents' indexes, each once, by falling relevance_score."""
    results = answer["results"]
    assert len(results) == (top_n or len(documents))
    indexes = [result["index"] for result in results]
    assert len(set(indexes)) == len(indexes) and set(indexes) <= set(range(len(documents)))
    scores = [result["relevance_score"] for result in results]
    assert all(isinstance(score, float) for score in scores) and scores == sorted(scores, reverse=True)


# --- rerank ---

@pytest.mark.llama
def test_rerank_orders_the_documents_and_counts_its_tokens(make_app, live_gateway, ranker, access_log):
    app, base = gateway(make_app, live_gateway, ranker.url)
    client = openai_sdk(base)
    answer = client.post("/rerank", body={**RERANK, "top_n": 2}, cast_to=object,
                         options={"headers": request_id_header("rerank-top")})
    check_ranking(answer, DOCUMENTS, top_n=2)
    everything = client.post("/rerank", body=RERANK, cast_to=object,
                             options={"headers": request_id_header("rerank-all")})
    check_ranking(everything, DOCUMENTS)
    used = answer["usage"]["prompt_tokens"]
    assert used > 0 and everything["usage"]["prompt_tokens"] == used
    line = access_log.line("rerank-top")
    assert (line["path"], line["status"], line["client_id"], line["prompt_tokens"]) == ("/v1/rerank", 200, TEAM_ID,
                                                                                         used)
    access_log.line("rerank-all")  # its metrics are taken just before its line is written
    assert value(scrape(app.test_client()), "gateway_tokens_total", client=TEAM_ID, kind="prompt") == 2 * used


@pytest.mark.llama
@pytest.mark.parametrize("path", RERANK_ROUTES)
def test_every_rerank_route_answers(make_app, live_gateway, ranker, path):
    _, base = gateway(make_app, live_gateway, ranker.url)
    response = post(base, path, {**RERANK, "top_n": 1})
    assert response.status_code == 200, response.text
    check_ranking(response.json(), DOCUMENTS, top_n=1)
    assert response.headers["x-ratelimit-limit-requests"] == "1000"


@pytest.mark.llama
def test_rerank_in_text_embeddings_inference_format_passes_as_llama_cpp_answers_it(make_app, live_gateway, ranker):
    # llama.cpp also takes Hugging Face TEI's rerank body ({"query", "texts"}, "return_text") and answers it with
    # a bare array of {"index", "score"[, "text"]}: TEI clients pointed at llama.cpp work, so through us too.
    _, base = gateway(make_app, live_gateway, ranker.url)
    response = post(base, "/rerank", {"query": "where is the cat", "texts": DOCUMENTS, "return_text": True})
    assert response.status_code == 200, (
        "BUG in service/: the gateway refuses (or cannot relay) llama.cpp's TEI rerank format; fix: "
        f"RerankSchema (schemas/llama.py) and read_json for a JSON array (see the report): {response.text}")
    ranked = response.json()
    assert sorted(result["index"] for result in ranked) == list(range(len(DOCUMENTS)))
    assert all(result["text"] == DOCUMENTS[result["index"]] for result in ranked)


@pytest.mark.llama
def test_rerank_without_a_reranker_is_llama_cpps_501_saying_what_to_set(make_app, live_gateway, llama):
    _, base = gateway(make_app, live_gateway, llama.url)
    with pytest.raises(openai.APIStatusError) as refused:
        openai_sdk(base).post("/rerank", body=RERANK, cast_to=object)
    assert refused.value.status_code == 501
    body = refused.value.body  # llama.cpp's own 501 in OpenAI's envelope, with the gateway's advice
    assert (body["type"], body["param"], body["code"]) == ("not_supported_error", None, None)
    assert set(body) == {"message", "type", "param", "code"}
    assert body["message"].startswith("This model does not support reranking: ")
    assert "MODEL_SETTINGS=<model>:rerank=on" in body["message"]
    assert "Start it with" not in body["message"]  # llama.cpp's advice: a flag of its own binary


@pytest.mark.llama
def test_an_image_for_a_model_without_a_projector_is_a_400_saying_what_it_needs(make_app, live_gateway, llama):
    _, base = gateway(make_app, live_gateway, llama.url)
    content = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": PIXEL}}]
    with pytest.raises(openai.BadRequestError) as refused:  # llama.cpp's 500: the client's input, not a failure
        openai_sdk(base).chat.completions.create(model="any", max_tokens=1,
                                                 messages=[{"role": "user", "content": content}])
    assert refused.value.type == "invalid_request_error"
    message = refused.value.body["message"]
    assert message.startswith("This model cannot read image input: ") and "multimodal projector" in message
    assert "LLAMA_SERVER_URL" in message and "provide the mmproj" not in message


# What llama.cpp answers when a feature is off (this build's words, measured on the demo model), and what the
# client gets instead: (llama.cpp's status, type and message; the client's status, type and words).
ADVISED = [
    (501, "not_supported_error", "This server does not support reranking. Start it with `--reranking`",
     501, "not_supported_error", "MODEL_SETTINGS=<model>:rerank=on"),
    (501, "not_supported_error", "This server does not support embeddings. Start it with `--embeddings`",
     501, "not_supported_error", "LLAMA_EMBEDDINGS=on or MODEL_SETTINGS=<model>:embeddings=on"),
    (500, "server_error", "audio input is not supported - hint: if this is unexpected, you may need to provide the "
     "mmproj", 400, "invalid_request_error", "This model cannot read audio input: that needs a multimodal projector"),
    (400, "invalid_request_error", "Multimodal data provided, but model does not support multimodal requests.",
     400, "invalid_request_error", "This model cannot read images or audio: that needs a multimodal projector"),
]


@pytest.mark.parametrize("status, kind, said, client_status, client_kind, words", ADVISED)
def test_llama_cpps_advice_to_pass_a_flag_becomes_what_to_set(make_app, live_gateway, httpserver, status, kind,
                                                              said, client_status, client_kind, words):
    httpserver.expect_request("/v1/embeddings").respond_with_json(
        {"error": {"code": status, "message": said, "type": kind}}, status=status)
    _, base = gateway(make_app, live_gateway, httpserver.url_for("").rstrip("/"))
    response = post(base, "/v1/embeddings", {"input": "hi"})
    error = response.json()["error"]
    assert (response.status_code, error["type"]) == (client_status, client_kind)
    assert words in error["message"] and "Start it with" not in error["message"]
    assert "provide the mmproj" not in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"query": "q"}, "documents"),
    ({"query": "q", "documents": []}, "documents"),
    ({"query": "q", "documents": ["a", 3]}, "documents[1]"),
    ({"documents": ["a"]}, "query"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
])
def test_rerank_without_what_it_needs_is_a_400_naming_it(make_app, live_gateway, httpserver, body, param):
    _, base = gateway(make_app, live_gateway, httpserver.url_for("").rstrip("/"))
    with pytest.raises(openai.BadRequestError) as refused:
        openai_sdk(base).post("/rerank", body=body, cast_to=object)
    assert refused.value.param == param and refused.value.type == "invalid_request_error"
    assert httpserver.log == []  # never reached llama.cpp


# --- tokenize, detokenize, apply-template ---

@pytest.mark.llama
def test_tokenize_and_detokenize_round_trip(make_app, live_gateway, llama):
    _, base = gateway(make_app, live_gateway, llama.url)
    client = openai_sdk(base, path="")  # llama.cpp's own routes have no /v1
    tokens = client.post("/tokenize", body={"content": "hello world"}, cast_to=object)["tokens"]
    assert tokens and all(isinstance(token, int) for token in tokens)
    text = client.post("/detokenize", body={"tokens": tokens}, cast_to=object)["content"]
    assert text.strip() == "hello world"
    pieces = client.post("/tokenize", body={"content": "hello world", "with_pieces": True}, cast_to=object)["tokens"]
    assert [piece["id"] for piece in pieces] == tokens
    assert "".join(piece["piece"] for piece in pieces).strip() == "hello world"


@pytest.mark.llama
def test_apply_template_renders_the_prompt(make_app, live_gateway, llama):
    _, base = gateway(make_app, live_gateway, llama.url)
    answer = openai_sdk(base, path="").post("/apply-template",
                                            body={"messages": [{"role": "user", "content": "hi there"}]},
                                            cast_to=object)
    assert isinstance(answer["prompt"], str) and "hi there" in answer["prompt"]


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "content"),
    ("/detokenize", {"tokens": ["a"]}, "tokens[0]"),
    ("/apply-template", {"messages": []}, "messages"),
    ("/infill", {"input_prefix": 3}, "input_prefix"),
])
def test_tokens_and_infill_bodies_are_checked(make_app, live_gateway, httpserver, path, body, param):
    _, base = gateway(make_app, live_gateway, httpserver.url_for("").rstrip("/"))
    with pytest.raises(openai.BadRequestError) as refused:
        openai_sdk(base, path="").post(path, body=body, cast_to=object)
    assert refused.value.param == param
    assert httpserver.log == []


# --- infill ---

@pytest.mark.llama
def test_infill_on_a_model_without_fim_tokens_is_llama_cpps_501_in_the_envelope(make_app, live_gateway, llama):
    _, base = gateway(make_app, live_gateway, llama.url)
    response = post(base, "/infill", {"input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n"})
    assert response.status_code == 501
    error = response.json()["error"]
    assert error["type"] == "not_supported_error" and "Infill is not supported" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"]


INFILL = {"input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n", "n_predict": 2}
# As llama.cpp's /infill and /completion answer (measured on /completion of this build): counts on every chunk,
# the final one with the model and the settings.
INFILL_CHUNKS = (b'data: {"index":0,"content":"a","tokens":[79],"stop":false,"id_slot":-1,"tokens_predicted":1,'
                 b'"tokens_evaluated":12}\n\n'
                 b'data: {"index":0,"content":" + b","tokens":[62],"stop":false,"id_slot":-1,"tokens_predicted":2,'
                 b'"tokens_evaluated":12}\n\n'
                 b'data: {"index":0,"content":"","tokens":[],"id_slot":0,"stop":true,"model":"coder-file",'
                 b'"tokens_predicted":2,"tokens_evaluated":12,"generation_settings":{"stop":[],"n_predict":2},'
                 b'"timings":{"prompt_n":12,"predicted_n":2}}\n\n')
INFILL_ANSWER = {"index": 0, "content": "a + b", "tokens": [], "stop": True, "model": "coder-file",
                 "tokens_predicted": 2, "tokens_evaluated": 12, "generation_settings": {"n_predict": 2}}


def fake_infill(httpserver):
    """The fake upstream answers /infill as llama.cpp does for a model with FIM tokens: SSE or JSON."""
    def answer(request):
        if json.loads(request.data).get("stream"):
            return Response([INFILL_CHUNKS], content_type="text/event-stream")
        return Response(json.dumps(INFILL_ANSWER), content_type="application/json")
    httpserver.expect_request("/infill", method="POST").respond_with_handler(answer)


def test_infill_answer_and_stream_pass_through_and_count_their_tokens(make_app, live_gateway, httpserver,
                                                                    access_log):
    fake_infill(httpserver)
    app, base = gateway(make_app, live_gateway, httpserver.url_for("").rstrip("/"))
    answer = post(base, "/infill", INFILL, **request_id_header("infill-json"))
    assert answer.status_code == 200 and answer.json() == INFILL_ANSWER
    stream = post(base, "/infill", {**INFILL, "stream": True}, **request_id_header("infill-stream"))
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.content == INFILL_CHUNKS  # exactly as llama.cpp sent it
    for request_id in ("infill-json", "infill-stream"):
        line = access_log.line(request_id)
        assert (line["status"], line["prompt_tokens"], line["completion_tokens"]) == (200, 12, 2)
    samples = scrape(app.test_client())
    assert value(samples, "gateway_tokens_total", client=TEAM_ID, kind="prompt") == 24
    assert value(samples, "gateway_tokens_total", client=TEAM_ID, kind="completion") == 4


# --- routing by model ---

@pytest.mark.llama
def test_routed_by_model_to_the_reranker_or_not(make_app, live_gateway, llama, ranker, access_log):
    app = routed_app(make_app, {"chat": [llama.url], "ranker": [ranker.url]}, **TEAM_KEY_SETTINGS)
    base = live_gateway(app)
    ranked = post(base, "/v1/rerank", RERANK, **request_id_header("routed-rerank"))
    assert ranked.status_code == 200 and ranked.json()["model"] == "ranker"
    check_ranking(ranked.json(), DOCUMENTS)
    assert access_log.line("routed-rerank")["model"] == "ranker"
    assert post(base, "/v1/rerank", {**RERANK, "model": "chat"}).status_code == 501  # the other llama.cpp
    tokens = post(base, "/tokenize", {"model": "chat", "content": "hello"})
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    unknown = post(base, "/tokenize", {"model": "nope", "content": "hello"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    missing = post(base, "/v1/rerank", {key: RERANK[key] for key in ("query", "documents")})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"


def test_routed_answers_give_back_the_clients_model_name(make_app, live_gateway, fake_upstreams):
    coder, ranker_fake = fake_upstreams(2)
    fake_infill(coder)
    ranked = {"model": "ranker-file.gguf", "object": "list", "usage": {"prompt_tokens": 7, "total_tokens": 7},
              "results": [{"index": 0, "relevance_score": 0.5}]}
    ranker_fake.expect_request("/v1/rerank").respond_with_json(ranked)
    app = routed_app(make_app, {"coder": [coder.url_for("").rstrip("/")],
                                "rank": [ranker_fake.url_for("").rstrip("/")]}, **TEAM_KEY_SETTINGS)
    base = live_gateway(app)
    assert post(base, "/v1/rerank", {**RERANK, "model": "rank"}).json() == {**ranked, "model": "rank"}
    assert post(base, "/infill", {**INFILL, "model": "coder"}).json() == {**INFILL_ANSWER, "model": "coder"}
    stream = post(base, "/infill", {**INFILL, "model": "coder", "stream": True}).content
    assert stream == INFILL_CHUNKS.replace(b'"model":"coder-file"', b'"model":"coder"')
