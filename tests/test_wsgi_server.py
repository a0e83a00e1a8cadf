"""The waitress server: stopping it from another thread, even when waitress has already closed its trigger."""
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
