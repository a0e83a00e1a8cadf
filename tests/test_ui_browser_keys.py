"""The operators' page's keys: each key with its budget as a bar and a chart of tokens per hour per key, in a real
browser (Debian's Chromium, by Playwright). /admin/keys and /admin/usage are the test's (page.route) for hostile
names and budgets near and past their end; one test reads them from a real gateway with an SQLite database.
"""
import contextlib
import json
import time
import urllib.parse
from datetime import datetime, timezone

import requests

from service import create_app
from tests import test_ui_browser, test_ui_browser_page
from tests.apps import FAST_SETTINGS
from tests.test_ui_browser import ADMIN_KEY, KEYS, WAIT_MS, served, sign_in
from tests.test_ui_browser_page import IMG, NOW, RTL, RTL_SHOWN, Stub

browser = test_ui_browser.browser  # the module's one Chromium
upstream = test_ui_browser.upstream  # a fake llama-server (its answers' usage: 14 + 11 tokens)
shell = test_ui_browser_page.shell  # a gateway without a database, serving the page

KEYS_EVERY_MS = 10000  # keys.js reads the keys every 10 s (the page's own refresh is every 2 s)
PAGE_MS = 2000
MONTH_END = datetime(2027, 2, 1, tzinfo=timezone.utc).timestamp()
DAY_END = datetime(2027, 1, 16, tzinfo=timezone.utc).timestamp()
HOUR_S = 3600
STORE_OFF = ("This gateway runs without a database: keys made at run time, budgets and kept usage need "
             "DATABASE_URL.")
NEAR_ID = "key_aaaaaaaaaaaa"


def stored(name, key_id, status="active", budget=None, **extra):
    """A stored key as GET /admin/keys lists it."""
    return {"id": key_id, "object": "api_key", "name": name, "prefix": "sk-gw-" + key_id[-2:], "models": None,
            "rpm": None, "tpm": None, "concurrent": None, "weight": None, "budget": budget, "expires_at": None,
            "revoked_at": None, "created_at": NOW - 86400, "status": status, "source": "database",
            "read_only": False, **extra}


def keys():
    """A key near its token budget (hostile name and model), one past its request budget, one well within,
    a revoked one, an expired one and the environment's."""
    return [
        stored(IMG, NEAR_ID, models=["chat", RTL], rpm=600, tpm=100000,
               budget={"tokens": 5000, "requests": None, "per": "month", "spent_tokens": 4500, "spent_requests": 12,
                       "resets_at": MONTH_END}),
        stored("team-over", "key_bbbbbbbbbbbb", budget={"tokens": None, "requests": 100, "per": "day",
                                                        "spent_tokens": 999, "spent_requests": 120,
                                                        "resets_at": DAY_END}),
        stored("team-low", "key_cccccccccccc", budget={"tokens": 1000, "requests": None, "per": "day",
                                                       "spent_tokens": 250, "spent_requests": 3,
                                                       "resets_at": DAY_END}),
        stored("team-gone", "key_dddddddddddd", status="revoked", revoked_at=NOW - HOUR_S),
        stored("team-old", "key_eeeeeeeeeeee", status="expired", expires_at=NOW - 60),
        {"id": "env:team_a", "object": "api_key", "name": "team_a", "prefix": None, "models": None, "rpm": 3,
         "tpm": None, "concurrent": None, "weight": None, "budget": None, "expires_at": None, "revoked_at": None,
         "created_at": None, "status": "active", "source": "environment", "read_only": True},
    ]


def period(epoch):
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def usage():
    """Ten keys' hourly rows (key i: 1010 - 100 i tokens; the first, the near key, on two models)."""
    rows = []
    for i in range(10):
        key, name = (NEAR_ID, IMG) if i == 0 else (f"key_{i:012d}", f"team-{i}")
        rows.append({"period": period(NOW - HOUR_S * (i % 5)), "key": key, "name": name, "model": "chat",
                     "requests": 1, "prompt_tokens": (10 - i) * 100, "completion_tokens": 10, "errors": 0,
                     "queue_ms": 0.0, "upstream_ms": 5.0})
    rows.append({**rows[0], "model": RTL, "prompt_tokens": 40, "completion_tokens": 10})
    return rows


USAGE_SUM = sum(1010 - 100 * i for i in range(10)) + 50


class KeysStub(Stub):
    """The stub of test_ui_browser_page, answering /admin/keys and /admin/usage too."""

    def __init__(self):
        super().__init__()
        self.keys, self.usage = keys(), usage()
        self.held = None  # a list: the admin routes' requests wait there until release()

    def answer(self, route):
        path = urllib.parse.urlsplit(route.request.url).path
        if not path.startswith("/admin/"):
            return super().answer(route)
        self.sent.append((route.request.method, path, route.request.url))
        if self.held is not None:
            return self.held.append(route)
        return self.fulfil(route)

    def fulfil(self, route):
        path = urllib.parse.urlsplit(route.request.url).path
        body = {"object": "list", "data": self.keys if path == "/admin/keys" else self.usage}
        return route.fulfill(status=200, json=body)

    def release(self, tab):
        """Answer the requests held, and let the page's script run on (its answers' promises) before returning."""
        held, self.held = self.held, None
        for route in held:
            with tab.expect_event("requestfinished"):
                self.fulfil(route)
        for _ in range(3):  # a MessageChannel's turn: not a timer, which the page's clock holds
            tab.evaluate("new Promise((done) => { const c = new MessageChannel(); c.port1.onmessage = done; "
                         "c.port2.postMessage(0); })")


@contextlib.contextmanager
def opened(chromium, url, width=1440, height=900, stub=None, clock=True):
    """A signed-in tab (the stub's answers, or the gateway's with stub=None); fails on any script error or policy
    violation."""
    context = chromium.new_context(viewport={"width": width, "height": height}, timezone_id="Asia/Kolkata")
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    problems = []
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.on("console", lambda message: "Content Security Policy" in message.text and problems.append(message.text))
    if clock:
        tab.clock.install(time=NOW)  # seconds, as Playwright for Python takes a number
    if stub is not None:
        for pattern in ("**/ui/api/**", "**/admin/**"):
            tab.route(pattern, stub.answer)
    sign_in(tab, url)
    tab.locator("#models tbody tr").first.wait_for()
    try:
        yield tab
    finally:
        context.close()
    assert problems == []


def key_row(tab, key_id):
    return tab.locator(f"#keys tbody tr[data-key-id='{key_id}']")


def fill_ratio(row):
    """How much of its track a budget bar's fill covers, as drawn."""
    return row.locator(".budget .track").evaluate(
        "track => track.firstElementChild.getBoundingClientRect().width / track.clientWidth")


def test_each_key_shows_as_text_with_its_budget_as_a_bar(browser, shell):
    stub = KeysStub()
    with opened(browser, shell, stub=stub) as tab:
        near = key_row(tab, NEAR_ID)
        near.get_by_text("4,500 of 5,000 (90%) tokens per month").wait_for()
        cells = near.locator("td").all_inner_texts()
        assert cells[:3] == [IMG, NEAR_ID, "sk-gw-aa…"] and cells[3].startswith("✓ active")
        assert cells[4:7] == ["database", f"chat, {RTL_SHOWN}", "600 requests/min, 100,000 tokens/min"]
        assert cells[8] == "1,060 tokens, 2 requests"  # its usage of the last 24 h, both models
        assert near.locator(".budget-text").inner_text() == "4,500 of 5,000 (90%) tokens per month ⚠ near budget"
        near.get_by_text("resets 2027-02-01 00:00:00 UTC").wait_for()
        assert abs(fill_ratio(near) - 0.9) < 0.02
        over = key_row(tab, "key_bbbbbbbbbbbb")
        over.get_by_text("120 of 100 (120%) requests per day").wait_for()
        over.get_by_text("✗ over budget").wait_for()
        assert abs(fill_ratio(over) - 1) < 0.01 and "failed" in over.get_attribute("class")
        low = key_row(tab, "key_cccccccccccc")
        assert abs(fill_ratio(low) - 0.25) < 0.02 and low.locator(".level").count() == 0
        assert low.locator(".budget").get_attribute("class") == "budget budget-ok"
        assert key_row(tab, "key_dddddddddddd").locator("td").nth(3).inner_text() == (
            "✗ revoked\nrevoked 2027-01-15 07:00:00 UTC")
        assert key_row(tab, "key_eeeeeeeeeeee").locator("td").nth(3).inner_text() == (
            "○ expired\nexpired 2027-01-15 07:59:00 UTC")
        env = key_row(tab, "env:team_a").locator("td").all_inner_texts()
        assert env[2:8] == ["none", "✓ active", "environment (read-only)", "every model", "3 requests/min", "none"]
        tab.get_by_label("Times").select_option("local")
        near.get_by_text("resets 2027-02-01 05:30:00 UTC+05:30").wait_for()
        assert tab.evaluate("window.__pwned") is None and tab.locator("img").count() == 0
        assert "\u202e" not in tab.evaluate("document.body.innerText")


def test_the_chart_draws_the_top_8_keys_and_the_others_summed(browser, shell):
    stub = KeysStub()
    with opened(browser, shell, stub=stub) as tab:
        chart = tab.locator("#keys-chart")
        chart.locator("canvas").first.wait_for()
        assert chart.get_attribute("data-points") == "24" and chart.get_attribute("data-lines") == "9"
        assert chart.get_attribute("data-sum") == str(USAGE_SUM)  # every token, once, in its hour
        summary = chart.locator(".summary").inner_text()
        assert summary.startswith(f"{IMG}: 1,060 tokens · team-1: 910 tokens")
        assert summary.endswith("team-7: 310 tokens · 2 other keys: 320 tokens")
        legend = chart.locator(".u-legend .u-label").all_inner_texts()
        assert legend[1] == IMG[:23] + "…" and legend[-1] == "2 other keys"  # text, cut, never markup
        asked = [url for method, path, url in stub.sent if path == "/admin/usage"]
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(asked[0]).query)
        assert query["group_by"] == ["hour"] and query["from"] == [str(NOW - 23 * HOUR_S)]
        assert tab.evaluate("window.__pwned") is None


def test_the_keys_are_read_every_10_s_not_at_each_refresh(browser, shell):
    stub = KeysStub()
    with opened(browser, shell, stub=stub) as tab:
        key_row(tab, NEAR_ID).wait_for()
        assert stub.count("/admin/keys") == 1
        states = stub.count("/ui/api/state")
        stub.keys[0]["budget"]["spent_tokens"] = 5200
        stub.wait_for(tab, "/ui/api/state", states + 3)  # three page refreshes (6 s): the keys are not read
        assert stub.count("/admin/keys") == 1
        stub.wait_for(tab, "/admin/keys", 2)  # 10 s after the first read
        key_row(tab, NEAR_ID).get_by_text("5,200 of 5,000 (104%) tokens per month").wait_for()
        key_row(tab, NEAR_ID).get_by_text("✗ over budget").wait_for()
        assert stub.count("/ui/api/state") >= states + 4


def test_without_a_database_one_line_says_so_and_sign_out_clears_the_keys(browser, shell):
    stub = KeysStub()
    with opened(browser, shell, stub=stub) as tab:
        key_row(tab, NEAR_ID).wait_for()
        tab.locator("#keys-chart canvas").first.wait_for()
        stub.held = []
        stub.wait_for(tab, "/admin/usage", 2)  # the next read (10 s later) waits for its answers
        stub.keys[1]["name"] = "team-late"
        tab.get_by_role("button", name="Sign out").click()
        tab.locator("#sign-in").wait_for()
        stub.release(tab)  # answers that come after signing out show nothing
        html = tab.evaluate("document.body.outerHTML")
        for gone in (NEAR_ID, "team-over", "team-late", "onerror", "4,500", "other keys"):
            assert gone not in html, gone
        assert tab.locator("#keys tbody tr, #keys-chart canvas").count() == 0
        tab.unroute("**/admin/**")  # the shell gateway has no DATABASE_URL: its own 404 store_off
        sign_in(tab, shell)
        status = tab.locator("#keys-status")
        status.get_by_text(STORE_OFF, exact=True).wait_for()  # one line, the page's own words
        assert tab.locator("#keys-shown").is_hidden() and tab.locator("#keys tbody tr").count() == 0
        asked = []
        tab.on("request", lambda sent: "/admin/" in sent.url and asked.append(sent.url))
        for _ in range(5):  # 25 s of the page's refreshes: the keys' 10 s twice over
            with tab.expect_response(lambda answer: "/ui/api/state" in answer.url):
                tab.clock.run_for(5_000)
        assert asked == []  # a gateway without a database is not asked again: each ask would be a failed request


def test_at_phone_width_each_key_is_a_card_in_reach(browser, shell):
    stub = KeysStub()
    with opened(browser, shell, width=390, height=844, stub=stub) as tab:
        key_row(tab, NEAR_ID).wait_for()
        tab.locator("#keys-chart canvas").first.wait_for()
        assert tab.evaluate("document.documentElement.scrollWidth") <= 390
        out = tab.evaluate("""() => [...document.querySelectorAll('#keys td, #keys caption, #keys-chart, .budget')]
            .filter((node) => { const box = node.getBoundingClientRect();
                                return box.left < 0 || box.right > 390 || node.scrollWidth > node.clientWidth + 1; })
            .map((node) => `${node.tagName} ${node.dataset.label || node.className}`)""")
        assert out == []
        labels = key_row(tab, NEAR_ID).evaluate(
            "tr => [...tr.cells].map((td) => getComputedStyle(td, '::before').content)")
        assert labels == [json.dumps(head.strip()) for head in tab.locator("#keys thead th").all_text_contents()]
        assert abs(fill_ratio(key_row(tab, NEAR_ID)) - 0.9) < 0.02


def test_a_key_made_on_a_real_gateway_shows_its_use(browser, upstream, tmp_path):
    app = create_app({**FAST_SETTINGS, **KEYS, "MODEL_UPSTREAMS": f"chat={upstream.url}",
                      "DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}"})
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        with served(app) as url:
            made = requests.post(url + "/admin/keys", headers=admin, timeout=10, json={
                "name": "team-x", "models": ["chat"], "budget": {"tokens": 30, "per": "day"}})
            assert made.status_code == 201
            made = made.json()
            answer = requests.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {made['key']}"},
                                   json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
                                   timeout=10)
            assert answer.status_code == 200
            for _ in range(WAIT_MS // 50):  # the request's usage is counted as its answer closes
                listed = requests.get(url + "/admin/keys", headers=admin, timeout=10).json()["data"]
                if listed[0]["budget"]["spent_tokens"] == 25:
                    break
                time.sleep(0.05)
            with opened(browser, url, clock=False) as tab:
                row = key_row(tab, made["id"])
                row.get_by_text("25 of 30 (83%) tokens per day").wait_for()
                row.get_by_text("⚠ near budget").wait_for()
                assert row.locator("td").nth(2).inner_text() == made["key"][:8] + "…"
                assert row.locator("td").nth(8).inner_text() == "25 tokens, 1 request"
                assert made["key"] not in tab.evaluate("document.body.innerText")  # the prefix alone
                tab.locator("#keys-chart .summary").get_by_text("team-x: 25 tokens").wait_for()
                assert tab.locator("#keys-chart").get_attribute("data-sum") == "25"
                assert key_row(tab, "env:team_a").locator("td").nth(4).inner_text() == "environment (read-only)"
    finally:
        app.extensions["store"].close()
