"""The operators' page in a real browser: Debian's Chromium, headless, driven by Playwright.

Skipped, saying why, where Chromium or Playwright is missing, unless GATEWAY_REQUIRE_BROWSER=1 (as .ci/run sets):
then their absence is a failure. The gateways run a pool of fake llama.cpp models (FakeSupervisor) in front of a
fake llama-server, under waitress, one browser for the whole module.
"""
import contextlib
import json
import os
import pathlib
import shutil
import threading
import time
import types

import pytest
import requests

from service import create_app
from service.llama.pool import ModelPool
from service.llama.pooled_model import PooledModel
from service.wsgi_server import make_server, stop_server
from tests.apps import FAST_SETTINGS
from tests.fakes import FakeSupervisor

ADMIN_KEY = "sk-admin-browser"
KEYS = {"ADMIN_API_KEY": ADMIN_KEY, "OPENAI_API_KEYS": "sk-a:team_a,sk-b:team_b",
        "RATE_LIMITS": "team_a:rpm=600:tpm=200000,team_b:rpm=60"}
WORDS = ["Silicon", " hums", " at", " dawn", ";", " caches", " warm", " like", " morning", " tea", "."]
HALFWAY = 4  # the fake's streams wait for the test after this many words
PACE_S = 0.02
HOSTILE = "<script>alert(1)</script>"
HOSTILE_FAILURE = "llama.cpp exited: <img src=x onerror=alert(2)>"
DOCS = pathlib.Path(__file__).parent.parent / "docs"
WAIT_MS = 5000  # the longest a change may take to show: the page refreshes every 2 s, at once after an action


def _chromium():
    """Playwright's sync API and Debian's Chromium, or a skip (a failure with GATEWAY_REQUIRE_BROWSER=1)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed (pip install -r tests/requirements.txt)"
    else:
        binary = shutil.which("chromium")
        if binary is not None:
            return sync_playwright, binary
        missing = "chromium is not installed (apt-get install chromium)"
    if os.environ.get("GATEWAY_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{missing}, and GATEWAY_REQUIRE_BROWSER=1 says the browser tests must run")
    pytest.skip(f"{missing}: the operators' page is not tested in a browser")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module."""
    sync_playwright, binary = _chromium()
    # Chromium's sandbox cannot start as root (CI runs as root); there is nothing untrusted to sandbox here.
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=binary, headless=True, args=args)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def upstream():
    """A fake llama-server: healthy, and streaming a haiku word by word to every chat, at a model's pace; a stream
    stops halfway until release is set (so that a test sees the first words before the last exist)."""
    from pytest_httpserver import HTTPServer
    from werkzeug import Response

    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)  # health probes go on while a stream waits
    server.start()
    server.expect_request("/health").respond_with_json({"status": "ok"})
    server.expect_request("/metrics").respond_with_data("llamacpp:requests_deferred 0\n")
    usage = {"prompt_tokens": 14, "completion_tokens": len(WORDS)}
    release = threading.Event()

    def chat(request):
        if not json.loads(request.get_data()).get("stream"):
            return Response(json.dumps({"object": "chat.completion", "choices": [], "usage": usage}),
                            content_type="application/json")

        def events():
            for number, word in enumerate(WORDS):
                if number == HALFWAY:
                    release.wait(WAIT_MS / 1000)
                time.sleep(PACE_S)  # the pace of generation, for a tokens/s like a small model's
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': word}}]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"

        return Response(events(), content_type="text/event-stream")

    server.expect_request("/v1/chat/completions").respond_with_handler(chat)
    yield types.SimpleNamespace(url=server.url_for("").rstrip("/"), release=release)
    release.set()
    server.clear()
    server.stop()


@contextlib.contextmanager
def served(app):
    """app under waitress on a free loopback port; yields its base URL."""
    server = make_server(app, host="127.0.0.1", port=0, threads=8, max_body_bytes=app.config["MAX_BODY_BYTES"])
    thread = threading.Thread(target=server.run, name="ui-gateway", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        stop_server(server)
        thread.join(5)
        app.extensions["upstream"].close()


@pytest.fixture(scope="module")
def gateway(upstream):
    """A gateway running two local models, "chat" (loaded) and "embed" (not), on the fake llama-server."""
    chat, embed = FakeSupervisor(upstream.url), FakeSupervisor(upstream.url.replace("127.0.0.1", "localhost"))
    pool = ModelPool([PooledModel("chat", chat), PooledModel("embed", embed)], max_loaded=2, load_timeout_s=5)
    app = create_app({**FAST_SETTINGS, **KEYS, "MODEL_UPSTREAMS": f"chat={chat.url},embed={embed.url}"}, pool=pool)
    pool.load("chat")
    with served(app) as url:
        for key in ("sk-a", "sk-a", "sk-b"):  # some traffic from the clients
            requests.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=10,
                          json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
        yield url


@pytest.fixture(scope="module")
def hostile_gateway(upstream):
    """A gateway whose every shown field that can carry text carries markup: a model's name (which MODEL_UPSTREAMS
    would refuse, so set afterwards), a model's load failure (llama.cpp's words), and a request path."""
    broken = FakeSupervisor("http://127.0.0.1:9")
    broken.fail_with = HOSTILE_FAILURE
    pool = ModelPool([PooledModel("broken", broken)], max_loaded=1, load_timeout_s=5)
    upstreams = f"evil={upstream.url},broken={broken.url}"
    app = create_app({**FAST_SETTINGS, **KEYS, "MODEL_UPSTREAMS": upstreams}, pool=pool)
    routes = app.extensions["router"].routes
    routes[HOSTILE] = routes.pop("evil")
    routes[HOSTILE].name = HOSTILE
    with served(app) as url:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        load = requests.post(url + "/models/load", headers=headers, json={"model": "broken"}, timeout=10)
        assert load.status_code == 503
        requests.get(url + f"/v1/models/{HOSTILE}", headers={"Authorization": "Bearer sk-b"}, timeout=10)
        assert requests.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-a"}, timeout=10,
                             json={"model": HOSTILE, "messages": [{"role": "user", "content": "hi"}]}).ok
        yield url


@pytest.fixture
def page(browser):
    """A fresh tab (its own sessionStorage), failing the test on any script error or policy violation."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    problems, dialogs = [], []
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.on("console", lambda message: "Content Security Policy" in message.text and problems.append(message.text))
    tab.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    yield tab
    context.close()
    assert problems == [] and dialogs == []


def sign_in(page, url, key=ADMIN_KEY):
    """Open the page and sign in with the keyboard alone."""
    page.goto(url + "/ui")
    page.keyboard.press("Tab")  # the skip link
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "admin-key"
    page.keyboard.type(key)
    page.keyboard.press("Enter")


def model_row(page, name):
    return page.locator("#models tbody tr").filter(has=page.get_by_text(name, exact=True))


def test_a_wrong_key_is_refused_and_the_admin_key_signs_in(page, gateway):
    sign_in(page, gateway, key="sk-a")  # a client's key is not the admin's
    page.get_by_text("Refused (403)").wait_for()
    assert page.locator("#dashboard").is_hidden() and page.evaluate("sessionStorage.length") == 0
    page.get_by_label("Admin key").fill("")
    page.keyboard.type(ADMIN_KEY)
    page.keyboard.press("Enter")
    model_row(page, "chat").get_by_text("✓ loaded").wait_for()
    model_row(page, "embed").get_by_text("○ unloaded").wait_for()
    assert page.locator("#sign-in").is_hidden()
    assert page.url == gateway + "/ui" and page.context.cookies() == []  # the key is in no URL and no cookie
    assert page.evaluate("Object.values(sessionStorage)") == [ADMIN_KEY]
    page.get_by_role("button", name="Sign out").click()
    assert page.evaluate("sessionStorage.length") == 0 and page.locator("#sign-in").is_visible()


def test_unloading_and_loading_a_model_with_its_buttons(page, gateway):
    # The page's timers stand still (no refresh every 2 s): what changes is shown by the refresh each action makes.
    page.clock.install(time=1_800_000_000)
    page.clock.pause_at(1_800_000_001)
    sign_in(page, gateway)
    page.get_by_role("button", name="Unload chat", exact=True).click()
    model_row(page, "chat").get_by_text("○ unloaded").wait_for()
    page.get_by_role("status").get_by_text("chat: unloaded").wait_for()
    load = page.get_by_role("button", name="Load chat", exact=True)
    load.focus()  # by keyboard, across the page's refreshes
    page.keyboard.press("Enter")
    model_row(page, "chat").get_by_text("✓ loaded").wait_for()
    recent = page.locator("#recent tbody")
    recent.get_by_text("POST /models/unload").wait_for()
    recent.get_by_text("POST /models/load").wait_for()


def test_the_playground_streams_an_answer_and_lists_its_request(page, gateway, upstream, tmp_path):
    sign_in(page, gateway)
    page.get_by_label("Model", exact=True).select_option("chat")
    page.get_by_label("Message", exact=True).fill("Write a haiku about CPUs.")
    page.get_by_role("button", name="Send", exact=True).click()
    answer, stats = page.locator("#play-answer"), page.locator("#play-stats")
    answer.get_by_text("".join(WORDS[:HALFWAY]), exact=True).wait_for()  # the first words, before the rest exist
    assert "streaming" in stats.inner_text() and "First token after" in stats.inner_text()
    upstream.release.set()
    answer.get_by_text("".join(WORDS), exact=True).wait_for()
    stats.get_by_text("tokens/s").wait_for()
    assert f"· {len(WORDS)} tokens ·" in stats.inner_text() and "First token after" in stats.inner_text()
    mine = page.locator("#recent tbody tr").filter(has_text="POST /ui/api/chat")
    mine.get_by_text("admin").wait_for()
    assert "✓ 200" in mine.first.inner_text() and f"14 + {len(WORDS)}" in mine.first.inner_text()
    clients = page.locator("#clients tbody")
    clients.locator("tr[data-client=team_a]").get_by_text("of 600").wait_for()
    page.set_viewport_size({"width": 1440, "height": 900})
    page.locator("#chart-requests").wait_for()
    screenshot(page, "ui.png", tmp_path)


def screenshot(page, name, tmp_path):
    """The README's pictures, refreshed with GATEWAY_UI_SCREENSHOT=1 (else every run would rewrite a tracked file)."""
    target = DOCS / name if os.environ.get("GATEWAY_UI_SCREENSHOT") == "1" else tmp_path / name
    target.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(target), full_page=True)
    assert target.read_bytes().startswith(b"\x89PNG")


def test_the_charts_draw_and_move_when_traffic_flows(page, gateway):
    sign_in(page, gateway)
    requests_chart = page.locator("#chart-requests")
    requests_chart.locator("canvas").wait_for()
    before = float(requests_chart.get_attribute("data-sum"))
    assert int(requests_chart.get_attribute("data-points")) == 360  # an hour of 10 s steps
    for key in ("sk-a", "sk-b"):
        assert requests.post(gateway + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]}, timeout=10).ok
    page.wait_for_function("([sum]) => Number(document.querySelector('#chart-requests').dataset.sum) > sum",
                           arg=[before])
    assert "requests/s: last" in requests_chart.locator(".summary").inner_text()
    page.locator("#chart-tokens").get_by_text("tokens/s: last").wait_for()
    page.get_by_label("Of", exact=True).select_option("chat")  # one model's series
    page.get_by_label("Over the last").select_option("day")
    page.wait_for_function("() => document.querySelector('#chart-requests').dataset.points === '288'")


def test_at_phone_width_every_column_is_in_reach(page, gateway, tmp_path):
    page.set_viewport_size({"width": 390, "height": 844})
    sign_in(page, gateway)
    model_row(page, "chat").wait_for()
    page.locator("#recent tbody tr").first.wait_for()
    page.locator("#chart-requests canvas").wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    out_of_reach = page.evaluate("""() => [...document.querySelectorAll('td, caption, h2, .chart')]
        .filter((node) => { const box = node.getBoundingClientRect(); return box.left < 0 || box.right > 390; })
        .map((node) => node.dataset.label || node.tagName)""")
    assert out_of_reach == []
    screenshot(page, "ui-phone.png", tmp_path)


def test_hostile_text_is_shown_as_text(page, hostile_gateway):
    sign_in(page, hostile_gateway)
    model_row(page, HOSTILE).get_by_text("✓ loaded").wait_for()
    model_row(page, "broken").get_by_text(HOSTILE_FAILURE).wait_for()
    recent = page.locator("#recent tbody")
    recent.get_by_text(f"GET /v1/models/{HOSTILE}").wait_for()
    recent.get_by_text(HOSTILE, exact=True).wait_for()  # the model of a chat request
    assert page.locator("#play-model option", has_text=HOSTILE).count() == 1
    assert page.locator("script").count() == 2 and page.locator("img").count() == 0  # uPlot's and the page's only
