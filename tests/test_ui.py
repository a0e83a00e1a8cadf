"""The operators' page (GET /ui) without a browser: the page and its policy, the JSON it reads (for the admin key
alone), what it shows of models, clients and the last requests, the playground's relay, and no CORS there.
tests/test_ui_browser.py drives the page itself in Chromium."""
import json
import logging
import pathlib
import re
import time

import pytest

from service import create_app
from service.llama.pool import ModelPool
from service.llama.pooled_model import PooledModel
from service.ui.recent import BUCKET_S, HOUR_S, RecentRequests
from service.ui.views import CONTENT_SECURITY_POLICY
from tests.apps import FAST_SETTINGS, routed_app
from tests.clients import assert_openai_envelope
from tests.fakes import Clock, FakeSupervisor

ADMIN_KEY = "sk-admin-ui-secret"
TEAM_KEY = "sk-team-ui"
KEYS = {"ADMIN_API_KEY": ADMIN_KEY, "OPENAI_API_KEYS": f"{TEAM_KEY}:team"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TEAM = {"Authorization": f"Bearer {TEAM_KEY}"}
STATE = "/ui/api/state"
MARKER = "zebra-marker-7781"  # in prompts and answers: never in what the page is sent
STREAM = (b'data: {"choices":[{"index":0,"delta":{"content":"' + MARKER.encode() + b'"}}]}\n\n'
          b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":1}}\n\ndata: [DONE]\n\n')
ANSWER = {"object": "chat.completion", "model": "file.gguf", "usage": {"prompt_tokens": 4, "completion_tokens": 2},
          "choices": [{"index": 0, "message": {"role": "assistant", "content": MARKER}}]}
STATIC = pathlib.Path(__file__).parent.parent / "service" / "ui" / "static"


@pytest.fixture
def upstream(httpserver):
    """A llama-server that is healthy, idle, and answers chat with MARKER (streamed when asked)."""
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    httpserver.expect_request("/metrics").respond_with_data("llamacpp:requests_deferred 0\n")

    def chat(request):
        from werkzeug import Response

        if json.loads(request.get_data()).get("stream"):
            return Response(STREAM, content_type="text/event-stream")
        return Response(json.dumps(ANSWER), content_type="application/json")

    httpserver.expect_request("/v1/chat/completions").respond_with_handler(chat)
    return httpserver.url_for("").rstrip("/")


@pytest.fixture
def gateway(make_app, upstream):
    """build(**settings): a test client of a keyed gateway routing model "chat" to the fake llama-server."""

    def build(**settings):
        return routed_app(make_app, {"chat": [upstream]}, **{**KEYS, **settings}).test_client()

    return build


def send(client, method, path, **options):
    """A request whose answer is closed as a server closes it: its record writes its log line then."""
    response = client.open(path, method=method, **options)
    response.get_data()
    response.close()
    return response


def chat(client, headers=TEAM, path="/v1/chat/completions", **fields):
    return send(client, "POST", path, headers=headers,
                json={"model": "chat", "messages": [{"role": "user", "content": MARKER}], **fields})


# -- the page ------------------------------------------------------------------------------------------------

def test_the_page_is_public_holds_only_the_sign_in_form_and_forbids_inline_script(gateway):
    page = send(gateway(), "GET", "/ui")  # no key: the page holds no data
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe" not in CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY and page.headers["X-Frame-Options"] == "DENY"
    assert 'id="sign-in-form"' in html
    # The key's input has no name: no form submission can ever carry it (nor put it in a URL).
    key_input = re.search(r"<input id=\"admin-key\"[^>]*>", html, re.S).group(0)
    assert " name=" not in key_input and 'type="password"' in key_input
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    # Scripts from the gateway's own files only (the page's, and the vendored chart library), none inline.
    assert scripts and all(body == "" and re.search(r'src="/ui/static/[^"]+\.js"', attributes)
                           for attributes, body in scripts)
    assert 'src="/ui/static/ui.js"' in html
    assert not re.search(r"\son[a-z]+\s*=", html) and "style=" not in html  # no inline handler or style


def test_without_the_admin_key_the_page_says_how_to_turn_it_on(gateway):
    client = gateway(ADMIN_API_KEY=None)
    html = send(client, "GET", "/ui").get_data(as_text=True)
    assert "Start the gateway with <code>ADMIN_API_KEY</code> set" in html and "sign-in-form" not in html
    error = assert_openai_envelope(send(client, "GET", STATE, headers=TEAM), 404)
    assert error["code"] == "admin_api_disabled"


def test_the_static_files_are_public_under_the_same_policy_and_closed_as_any_answer(gateway, caplog):
    client = gateway()
    caplog.set_level(logging.DEBUG, logger="service.access")
    for name, mimetype in (("ui.js", "text/javascript"), ("ui.css", "text/css"), ("icon.svg", "image/svg+xml")):
        response = send(client, "GET", f"/ui/static/{name}")
        assert response.status_code == 200 and response.mimetype == mimetype
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        # Its close ran: the request is no longer in flight (graceful shutdown waits for that), and it is logged.
        assert client.application.extensions["lifecycle"].in_flight == 0
    assert [record.fields["path"] for record in caplog.records if record.getMessage() == "request"] == [
        "/ui/static/ui.js", "/ui/static/ui.css", "/ui/static/icon.svg"]
    assert {record.levelno for record in caplog.records if record.getMessage() == "request"} == {logging.DEBUG}


def test_the_script_builds_the_page_from_text_never_from_markup():
    code = "\n".join(path.read_text() for path in STATIC.glob("*.js"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "localStorage", "document.cookie"):
        assert sink not in code, sink
    assert "sessionStorage" in code


# -- the state's auth ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [STATE, "/ui/api/chat"])
@pytest.mark.parametrize("headers, status, code", [
    ({}, 401, "invalid_api_key"),
    ({"Authorization": "Bearer sk-wrong"}, 401, "invalid_api_key"),
    (TEAM, 403, "admin_key_required"),
])
def test_the_pages_data_needs_the_admin_key(gateway, path, headers, status, code):
    method = "GET" if path == STATE else "POST"
    error = assert_openai_envelope(send(gateway(), method, path, headers=headers, json={}), status)
    assert error["code"] == code


def test_the_state_is_never_cached(gateway):
    response = send(gateway(), "GET", STATE, headers=ADMIN)
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"


# -- what it shows -------------------------------------------------------------------------------------------

def test_models_show_status_health_replicas_and_load(gateway, upstream):
    state = send(gateway(), "GET", STATE, headers=ADMIN).get_json()
    [model] = state["models"]
    assert (model["name"], model["status"], model["health"], model["managed"]) == ("chat", "loaded", "ok", False)
    assert (model["in_flight"], model["queued"]) == (0, 0)
    [replica] = model["replicas"]
    assert replica["url"] == upstream and replica["health"] == "ok" and replica["ejected"] is False


def test_one_llama_server_for_any_model_name_is_one_row(make_app, upstream):
    client = make_app(upstream, **KEYS).test_client()  # LLAMA_SERVER_URL: any name reaches it
    [model] = send(client, "GET", STATE, headers=ADMIN).get_json()["models"]
    assert (model["name"], model["any_name"], model["status"], model["managed"]) == (None, True, "loaded", False)
    assert [replica["url"] for replica in model["replicas"]] == [upstream]


def test_a_local_model_shows_the_pools_status_and_why_its_load_failed(upstream):
    broken = FakeSupervisor("http://127.0.0.1:9")
    broken.fail_with = "llama.cpp exited with code 1 while starting; its last lines:\nbad magic"
    pool = ModelPool([PooledModel("chat", FakeSupervisor(upstream)), PooledModel("broken", broken)],
                     max_loaded=2, load_timeout_s=5)
    app = create_app({**FAST_SETTINGS, **KEYS, "MODEL_UPSTREAMS": f"chat={upstream},broken={broken.url}"}, pool=pool)
    client = app.test_client()
    try:
        assert send(client, "POST", "/models/load", headers=ADMIN, json={"model": "broken"}).status_code == 503
        models = {model["name"]: model for model in send(client, "GET", STATE, headers=ADMIN).get_json()["models"]}
    finally:
        app.extensions["upstream"].close()
    assert (models["chat"]["status"], models["chat"]["managed"]) == ("unloaded", True)
    assert models["broken"]["status"] == "failed" and "bad magic" in models["broken"]["failure"]


def test_the_last_requests_come_from_the_records_newest_first_never_with_text(gateway, access_log):
    client = gateway()
    assert chat(client).status_code == 200
    assert chat(client, stream=True).status_code == 200
    assert send(client, "GET", "/v1/models/nope", headers=TEAM).status_code == 404
    response = send(client, "GET", STATE, headers=ADMIN)
    assert MARKER not in response.get_data(as_text=True)  # no prompt, no answer
    recent = response.get_json()["recent"]
    assert [entry["path"] for entry in recent] == ["/v1/models/nope", "/v1/chat/completions", "/v1/chat/completions"]
    missing, streamed, plain = recent
    assert (missing["status"], missing["error"], missing["client_id"]) == (404, "model_not_found", "team")
    assert (plain["model"], plain["route"], plain["prompt_tokens"], plain["completion_tokens"]) == (
        "chat", "/v1/chat/completions", 4, 2)
    assert streamed["ttft_ms"] <= streamed["duration_ms"] and streamed["completion_tokens"] == 1
    logged = {line["request_id"]: line for line in access_log.lines}
    for entry in recent:  # the same facts as the request's log line
        line = logged[entry["request_id"]]
        assert {key: entry[key] for key in line} == line
        assert entry["time"] <= recent[0]["time"]


def test_page_views_and_state_polls_stay_out_of_the_log_and_the_list(gateway, access_log):
    client = gateway()
    for path in ("/ui", "/ui/static/ui.js"):
        assert send(client, "GET", path).status_code == 200
    assert send(client, "GET", STATE, headers=ADMIN).status_code == 200
    refused = send(client, "GET", STATE, headers={"Authorization": "Bearer sk-wrong"})
    recent = send(client, "GET", STATE, headers=ADMIN).get_json()["recent"]
    # A refused poll is a failure: logged, and listed; the good ones neither.
    assert [line["path"] for line in access_log.lines] == [STATE]
    assert [entry["request_id"] for entry in recent] == [refused.headers["x-request-id"]]


def test_clients_show_the_hour_their_limits_headroom_and_requests_waiting(gateway):
    client = gateway(RATE_LIMITS="team:rpm=10:tpm=1000", MODEL_SETTINGS="chat:slots=1")
    assert chat(client).status_code == 200
    assert send(client, "GET", "/v1/models/nope", headers=TEAM).status_code == 404
    app = client.application
    route = app.extensions["router"].routes["chat"]
    scheduler = app.extensions["scheduler"]
    holding, waiting = scheduler.enter(route, "team"), scheduler.enter(route, "team")  # one slot: one waits
    try:
        clients = {entry["id"]: entry for entry in send(client, "GET", STATE, headers=ADMIN).get_json()["clients"]}
    finally:
        waiting.release()
        holding.release()
    team = clients["team"]
    assert (team["requests"], team["tokens"], team["failures"], team["waiting"]) == (2, 6, 1, 1)
    # The limits' window counts the chat alone: model listings count against no limit.
    assert (team["window_requests"], team["window_tokens"]) == (1, 6)
    assert team["limits"] == {"rpm": 10, "tpm": 1000, "concurrent": 0}


def test_every_configured_client_is_listed_even_before_its_first_request(gateway):
    clients = send(gateway(), "GET", STATE, headers=ADMIN).get_json()["clients"]
    assert [entry["id"] for entry in clients] == ["team"] and clients[0]["requests"] == 0


# -- the playground ------------------------------------------------------------------------------------------

def test_the_playground_streams_through_the_proxy_as_admin_and_is_listed(gateway, httpserver):
    client = gateway(RATE_LIMIT_RPM="1")  # a client limit the admin's playground is not under
    for _ in range(2):
        response = chat(client, headers=ADMIN, path="/ui/api/chat", stream=True)
        assert response.status_code == 200 and response.mimetype == "text/event-stream"
        assert MARKER.encode() in response.get_data() and response.get_data().endswith(b"data: [DONE]\n\n")
    sent = httpserver.log[-1][0]
    assert ADMIN_KEY not in str(sent.headers) and sent.path == "/v1/chat/completions"
    state = send(client, "GET", STATE, headers=ADMIN).get_json()
    [latest, _] = state["recent"]
    assert (latest["client_id"], latest["route"], latest["model"], latest["status"]) == (
        "admin", "/ui/api/chat", "chat", 200)
    assert latest["completion_tokens"] == 1 and latest["ttft_ms"] is not None
    admin = {entry["id"]: entry for entry in state["clients"]}["admin"]
    assert (admin["requests"], admin["limits"]) == (2, None)  # the admin key is under no client limit


def test_the_playground_validates_as_chat_does(gateway):
    error = assert_openai_envelope(send(gateway(), "POST", "/ui/api/chat", headers=ADMIN, json={"model": "chat"}), 400)
    assert error["param"] == "messages"


# -- other origins -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/ui", STATE, "/ui/api/chat", "/models/load", "/models/unload"])
def test_no_other_origin_may_read_the_page_or_call_the_admin_routes(gateway, path):
    client = gateway(CORS_ORIGINS="https://app.example")
    origin = {"Origin": "https://app.example"}
    preflight = send(client, "OPTIONS", path, headers={**origin, "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "authorization"})
    assert "Access-Control-Allow-Origin" not in preflight.headers
    answer = send(client, "GET" if path in ("/ui", STATE) else "POST", path, headers={**origin, **ADMIN}, json={})
    assert "Access-Control-Allow-Origin" not in answer.headers
    # The API itself still is open to that origin.
    api = send(client, "OPTIONS", "/v1/chat/completions", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert api.headers["Access-Control-Allow-Origin"] == "https://app.example"


# -- the list itself -----------------------------------------------------------------------------------------

def entry(client="team", at=0.0, status=200, tokens=(1, 2)):
    return {"client_id": client, "time": at, "status": status, "prompt_tokens": tokens[0],
            "completion_tokens": tokens[1]}


def test_the_list_is_a_bounded_ring_newest_first():
    recent = RecentRequests(size=3, clock=Clock())
    for number in range(5):
        recent.add({**entry(), "request_id": str(number)})
    assert [item["request_id"] for item in recent.latest()] == ["4", "3", "2"]


def test_client_counts_cover_the_last_hour_and_the_window():
    clock = Clock()
    recent = RecentRequests(clock=clock)
    recent.add(entry(at=clock.now - HOUR_S + BUCKET_S))  # its bucket leaves the hour first
    recent.add(entry(at=clock.now - 120))
    recent.add(entry(at=clock.now - 5, status=429, tokens=(0, 0)))
    recent.add(entry(client=None, at=clock.now))  # refused before its client was known: nobody's
    counts = recent.by_client(60)
    assert counts == {"team": {"requests": 3, "tokens": 6, "failures": 1, "window_requests": 1, "window_tokens": 0}}
    clock.now += 2 * BUCKET_S
    assert recent.by_client(60)["team"]["requests"] == 2
    clock.now += HOUR_S
    assert recent.by_client(60) == {} and len(recent.latest()) == 4


def test_a_flood_of_keyless_refusals_keeps_the_real_requests_and_long_paths_are_cut():
    from service.operations.request_log import PATH_SHOWN, shown_path

    recent = RecentRequests(size=3, clock=Clock())
    recent.add({**entry(), "request_id": "real"})
    for number in range(50):
        recent.add({**entry(client=None, status=401), "request_id": f"junk{number}"})
    listed = [item["request_id"] for item in recent.latest()]
    assert "real" in listed and len(listed) <= 3 + 20
    assert shown_path("/" + "B" * 250_000) == "/" + "B" * (PATH_SHOWN - 1) + "…"


# -- issue 24: what the page counts, the gateway's start, the charts' data, in flight, llama.cpp's log --------

NEW_ROUTES = [("GET", "/ui/api/history"), ("GET", "/ui/api/inflight"), ("GET", "/ui/api/models/chat/log"),
              ("POST", "/ui/api/requests/some-id/cancel")]


@pytest.mark.parametrize("method, path", NEW_ROUTES)
@pytest.mark.parametrize("headers, status, code", [
    ({}, 401, "invalid_api_key"),
    (TEAM, 403, "admin_key_required"),
])
def test_the_pages_new_data_needs_the_admin_key(gateway, method, path, headers, status, code):
    error = assert_openai_envelope(send(gateway(), method, path, headers=headers), status)
    assert error["code"] == code


def test_the_state_says_when_the_gateway_started_so_that_the_page_can_tell_a_restart(gateway):
    import service
    client = gateway()
    first, second = (send(client, "GET", STATE, headers=ADMIN).get_json()["gateway"] for _ in range(2))
    assert first["started_at"] == second["started_at"] <= first["now"] <= second["now"]
    assert first["version"] == service.__version__
    before = time.time()
    restarted = send(gateway(), "GET", STATE, headers=ADMIN).get_json()["gateway"]  # another start: another time
    assert first["started_at"] <= before <= restarted["started_at"]


def test_a_client_limited_to_3_a_minute_never_shows_4_of_3_and_every_refusal_is_a_failure(gateway):
    client = gateway(RATE_LIMITS="team:rpm=3")
    assert [chat(client).status_code for _ in range(4)] == [200, 200, 200, 429]
    state = send(client, "GET", STATE, headers=ADMIN).get_json()
    team = {entry["id"]: entry for entry in state["clients"]}["team"]
    assert (team["requests"], team["failures"], team["window_requests"], team["limits"]["rpm"]) == (4, 1, 3, 3)
    refused = state["recent"][0]
    assert refused["error"] == "rate_limit_exceeded" and refused["request_id"] and refused["time"] > 0


def test_a_failure_after_the_200_is_counted_as_a_failure():
    recent = RecentRequests(clock=Clock())
    recent.add({**entry(), "error": "upstream_bad_response"})  # a stream that broke after its 200
    recent.add({**entry(), "error": "client_closed_request"})
    recent.add(entry())
    assert recent.by_client(60)["team"]["failures"] == 2


def test_the_history_counts_the_traffic_per_model_and_not_the_pages_own_polls(gateway):
    client = gateway()
    assert chat(client).status_code == 200
    assert chat(client, stream=True).status_code == 200
    assert send(client, "POST", "/v1/chat/completions", headers=TEAM,
                json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}).status_code == 404
    for _ in range(3):  # the page's polls: neither charted nor listed
        hour = send(client, "GET", "/ui/api/history?window=hour", headers=ADMIN).get_json()
        assert send(client, "GET", "/ui/api/inflight", headers=ADMIN).status_code == 200
    assert (hour["window"], hour["step_s"], set(hour["series"])) == ("hour", 10, {"*", "chat"})
    overall, model = hour["series"]["*"], hour["series"]["chat"]
    assert len(overall["t"]) == 360 and hour["start"] == overall["t"][0]
    assert sum(overall["requests_per_s"]) * 10 == pytest.approx(3) and sum(overall["errors"]) == 1
    assert sum(model["requests_per_s"]) * 10 == pytest.approx(2) and sum(model["errors"]) == 0
    assert sum(model["tokens_per_s"]) * 10 == pytest.approx(3)  # 2 + 1 completion tokens
    assert [ms for ms in model["ttft_p50_ms"] if ms is not None]  # the stream's first token
    day = send(client, "GET", "/ui/api/history?window=day", headers=ADMIN).get_json()
    assert (day["step_s"], len(day["series"]["*"]["t"])) == (300, 288)
    recent = send(client, "GET", STATE, headers=ADMIN).get_json()["recent"]
    assert {item["path"] for item in recent} == {"/v1/chat/completions"}
    assert [item["model"] for item in recent] == ["nope", "chat", "chat"]  # the 404's too: the name it asked for
    error = assert_openai_envelope(send(client, "GET", "/ui/api/history?window=week", headers=ADMIN), 400)
    assert error["param"] == "window"


def test_nothing_in_flight_and_a_cancel_of_no_such_request_is_a_404(gateway):
    client = gateway()
    assert send(client, "GET", "/ui/api/inflight", headers=ADMIN).get_json() == {"data": []}
    error = assert_openai_envelope(send(client, "POST", "/ui/api/requests/nope/cancel", headers=ADMIN), 404)
    assert error["code"] == "request_not_in_flight"


def test_the_log_of_a_model_the_gateway_does_not_run_is_a_404(gateway):
    client = gateway()
    for name in ("chat", "nope"):  # a llama-server run elsewhere: its log is not the gateway's to show
        error = assert_openai_envelope(send(client, "GET", f"/ui/api/models/{name}/log", headers=ADMIN), 404)
        assert error["code"] == "model_not_found"
