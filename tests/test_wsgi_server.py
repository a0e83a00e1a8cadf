"""The waitress server: its own errors in the client's envelope, and stopping it from another thread, even when
waitress has already closed its trigger."""
import threading

import requests

from service.wsgi_server import make_server, stop_server


def test_a_stop_that_finds_the_trigger_closed_still_ends_the_loop(make_app, httpserver):
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    app = make_app(httpserver.url_for("").rstrip("/"))
    server = make_server(app, host="127.0.0.1", port=0, threads=2, max_body_bytes=1024)
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    assert requests.get(f"http://127.0.0.1:{server.effective_port}/health", timeout=5).status_code == 200
    server.trigger.close()  # what a race inside waitress can leave behind (Pylons/waitress#468)
    stop_server(server)
    loop.join(5)
    assert not loop.is_alive()


def test_waitress_own_413_speaks_the_clients_family(make_app, httpserver, live_gateway):
    # waitress refuses a body over MAX_BODY_BYTES before Flask runs: the envelope still follows the route's family.
    base = live_gateway(make_app(httpserver.url_for("").rstrip("/"), MAX_BODY_BYTES="1000"))
    big = b'{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "' + b"x" * 2000 + b'"}]}'
    anthropic = requests.post(base + "/v1/messages", data=big, timeout=10,
                              headers={"Content-Type": "application/json", "anthropic-version": "2023-06-01"})
    assert anthropic.status_code == 413
    assert anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "request_too_large"
    assert "MAX_BODY_BYTES" in anthropic.json()["error"]["message"]
    assert anthropic.headers["request-id"] == anthropic.headers["x-request-id"]
    openai = requests.post(base + "/v1/chat/completions", data=big, timeout=10,
                           headers={"Content-Type": "application/json"})
    assert openai.status_code == 413 and set(openai.json()["error"]) == {"message", "type", "param", "code"}
    assert "request-id" not in openai.headers and openai.headers["x-request-id"]
    assert httpserver.log == []
