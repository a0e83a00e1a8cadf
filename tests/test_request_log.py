"""The one JSON log line per request: its fields, and never a key or a prompt."""
import json
import logging
import time

import pytest
import requests

from service.operations.logs import JsonFormatter, TextFormatter, uses_json
from service.operations.request_log import RequestRecord, request_id_from

SECRET_KEY = "sk-very-secret-key-1234"
SECRET_PROMPT = "my secret prompt about zebras"


def logged_lines(caplog) -> list:
    """Every captured log record as the JSON line the gateway would write; each must parse."""
    formatter = JsonFormatter()
    return [json.loads(formatter.format(record)) for record in caplog.records]


@pytest.fixture
def keyed_gateway(make_app, llama, live_gateway):
    app = make_app(llama.url, OPENAI_API_KEYS=f"{SECRET_KEY}:team_a", RATE_LIMIT_TPM="100000")
    return live_gateway(app)


@pytest.mark.llama
def test_one_line_per_request_with_its_fields(keyed_gateway, caplog):
    caplog.set_level(logging.INFO)
    headers = {"Authorization": f"Bearer {SECRET_KEY}", "x-request-id": "log-test-1"}
    body = {"messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 3, "ignore_eos": True}
    assert requests.post(keyed_gateway + "/v1/chat/completions", json=body, headers=headers, timeout=30).ok
    stream = requests.post(keyed_gateway + "/v1/chat/completions", json={**body, "stream": True},
                           headers={**headers, "x-request-id": "log-test-2"}, timeout=30)
    assert stream.ok and stream.content.endswith(b"data: [DONE]\n\n")
    requests.post(keyed_gateway + "/v1/chat/completions", json={"messages": "nope"},
                  headers={**headers, "x-request-id": "log-test-3"}, timeout=30)
    requests.get(keyed_gateway + "/v1/models", headers={"Authorization": "Bearer wrong-key"}, timeout=30)

    # Each line is written when waitress closes its response, just after the client has it: wait for all four.
    deadline = time.monotonic() + 5
    while len([line for line in logged_lines(caplog) if line["event"] == "request"]) < 4:
        assert time.monotonic() < deadline, "the request lines were never logged"
        time.sleep(0.01)
    lines = logged_lines(caplog)
    access = {line.get("request_id"): line for line in lines if line["event"] == "request"}
    plain = access["log-test-1"]
    assert plain["client_id"] == "team_a" and plain["method"] == "POST"
    assert plain["path"] == "/v1/chat/completions" and plain["status"] == 200
    assert plain["duration_ms"] >= plain["upstream_ms"] > 0
    assert (plain["prompt_tokens"] > 0, plain["completion_tokens"]) == (True, 3)
    assert plain["retries"] == 0 and "error" not in plain and "ttft_ms" not in plain
    streamed = access["log-test-2"]
    assert streamed["completion_tokens"] == 3  # counted from the usage chunk the client never saw
    assert 0 < streamed["ttft_ms"] <= streamed["duration_ms"]
    assert access["log-test-3"]["status"] == 400 and access["log-test-3"]["error"] == "invalid_request_error"
    refused = [line for line in access.values() if line["status"] == 401]
    assert refused and refused[0]["error"] == "invalid_api_key" and "client_id" not in refused[0]
    for line in lines:
        assert {"ts", "level", "event"} <= set(line)
    everything = "\n".join(JsonFormatter().format(r) + TextFormatter().format(r) for r in caplog.records)
    assert SECRET_KEY not in everything and "wrong-key" not in everything
    assert "zebras" not in everything


def access_levels(caplog) -> dict:
    """The level of each access-log line, by request id."""
    return {record.fields["request_id"]: record.levelno for record in caplog.records
            if record.name == "service.access"}


def test_polled_paths_log_at_debug_unless_they_fail(make_app, httpserver, caplog):
    caplog.set_level(logging.DEBUG, logger="service.access")
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    httpserver.expect_request("/v1/models").respond_with_json({"data": [{"id": "m"}]})
    up = make_app(httpserver.url_for("").rstrip("/"), OPENAI_API_KEYS="key-1:team", METRICS_REQUIRE_KEY="1")
    down = make_app("http://127.0.0.1:9")  # nothing listens on the discard port: /health is 503
    key = {"Authorization": "Bearer key-1"}
    calls = {"health-ok": (up, "/health", {}), "metrics-ok": (up, "/metrics", key),
             "health-503": (down, "/health", {}), "metrics-401": (up, "/metrics", {}),
             "models-ok": (up, "/v1/models", key)}
    statuses = {}
    for request_id, (app, path, headers) in calls.items():
        response = app.test_client().get(path, headers={**headers, "x-request-id": request_id})
        response.close()  # as a server would: the line is written when the body is closed
        statuses[request_id] = response.status_code
    assert statuses == {"health-ok": 200, "metrics-ok": 200, "health-503": 503, "metrics-401": 401, "models-ok": 200}
    levels = access_levels(caplog)
    assert set(levels) == set(calls)  # one line each
    assert levels["health-ok"] == levels["metrics-ok"] == logging.DEBUG  # polled often: quiet while they succeed
    assert min(levels["health-503"], levels["metrics-401"], levels["models-ok"]) >= logging.INFO


def test_formats():
    record = logging.LogRecord("service.access", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"request_id": "r1", "status": 200}
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "request" and line["request_id"] == "r1" and line["ts"].endswith("Z")
    assert TextFormatter().format(record).endswith("INFO    request request_id=r1 status=200")


def test_auto_format_is_text_on_a_terminal():
    class Terminal:
        def isatty(self):
            return True

    assert uses_json("auto", Terminal()) is False
    assert uses_json("json", Terminal()) is True
    assert uses_json("text") is False


def test_request_ids():
    assert request_id_from("ok-1") == "ok-1"
    assert request_id_from(None) != request_id_from(None)


def test_record_takes_usage():
    record = RequestRecord("r", "POST", "/", 0.0)
    record.add_tokens(7, None)
    record.add_tokens(None, 5)  # a later event says only the completion (Anthropic's message_delta)
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (7, 5, 12)
    record.add_tokens(None, None)
    assert record.total_tokens == 12
