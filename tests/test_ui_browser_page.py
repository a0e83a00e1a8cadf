"""The operators' page drawing what the gateway says, in a real browser (Debian's Chromium, by Playwright).

The page and its files come from a real gateway; its JSON (/ui/api/..., /models/load) is answered by the test
(Playwright's page.route), so that hostile names, every status, times and failures are drawn deterministically.
tests/test_ui_browser.py drives the page against a gateway's real answers.
"""
import contextlib
import json
import pathlib
import urllib.parse

import pytest

from service import create_app
from tests.apps import FAST_SETTINGS
from tests import test_ui_browser
from tests.test_ui_browser import KEYS, WAIT_MS, served, sign_in

browser = test_ui_browser.browser  # the module's one Chromium, as there

NOW = 1_800_000_000  # 2027-01-15 08:00:00 UTC
IMG = "<img src=x onerror=window.__pwned=1>"
RTL = "rtl-\u202egnp.exe.gguf"
RTL_SHOWN = "rtl-\\u202egnp.exe.gguf"  # as the page writes it: the override spelled out, never obeyed
LONG = "q" * 235 + ".gguf"
FAILURE = "llama.cpp exited: <img src=x onerror=window.__pwned=2>"
REQUEST_ID = "5f1c2d3e4b5a69788796a5b4c3d2e1f0"
CANCEL_ID = "req-cancel-me-123456"  # two requests in flight send it (the client chooses it)
HANDLES = ("3f9a1c2b7d4e", "0b8e6d5c4a31")  # the gateway's name for each of their calls
REFRESH_MS = 2000  # the page's refresh (ui.js), and the log panel's


def life(**facts):
    """A model's life as /ui/api/state gives it, with the facts given."""
    return {"memory_mib": 812.0, "ctx": 4096, "slots_total": 2, "slots_busy": 0, "load_s": 2.4,
            "loaded_at": NOW - 600, "last_used": NOW - 30, "idle_unload_at": NOW + 870, "restarts": 0,
            "last_exit": None, "last_exit_at": None, "pinned": False, "load_unloads": [], "kv": None, **facts}


def model(name, status, **extra):
    """One model of /ui/api/state, managed by the gateway."""
    return {"name": name, "any_name": False, "managed": True, "status": status, "health": "ok", "failure": None,
            "in_flight": 0, "queued": 0, "replicas": [{"url": f"http://127.0.0.1:8081/{name}", "health": "ok",
                                                       "latency_ms": 3, "in_flight": 0, "ejected": False,
                                                       "slots": 2, "reason": None}], **extra}


def entry(seconds_ago, request_id, client, model_name, status, **extra):
    """One of the last requests, as its log line says it."""
    return {"time": NOW - seconds_ago, "request_id": request_id, "client_id": client, "model": model_name,
            "method": "POST", "path": "/v1/chat/completions", "status": status, "duration_ms": 812.5,
            "ttft_ms": 95.0, "prompt_tokens": 14, "completion_tokens": 11, "route": "chat", **extra}


def state():
    """A gateway's state with every status, hostile names in every field that can carry one, and a restart."""
    return {
        "gateway": {"started_at": NOW - 3600, "version": "test", "now": NOW},
        "window_s": 60,
        "models": [
            model("chat", "loaded", life=life(restarts=2, last_exit="signal 9 (killed)", last_exit_at=NOW - 60,
                                              slots_busy=1, kv={"states": 3, "tokens": 2048, "bytes": 6291456})),
            model(IMG, "unloading", in_flight=2, life=life()),
            model(RTL, "failed", failure=FAILURE, life=life(load_unloads=["chat"], loaded_at=None)),
            model(LONG, "restarting", life=life(pinned=True)),
            model("embed", "unloaded", life=life(load_unloads=["chat", IMG], loaded_at=None)),
        ],
        "clients": [
            {"id": "team_a", "requests": 3, "tokens": 75, "failures": 2, "window_requests": 3, "window_tokens": 75,
             "waiting": 0, "limits": {"rpm": 3, "tpm": None, "concurrent": None}},
            {"id": IMG, "requests": 1, "tokens": 25, "failures": 0, "window_requests": 1, "window_tokens": 25,
             "waiting": 1, "limits": None},
        ],
        "recent": [
            entry(5, REQUEST_ID, "team_a", "chat", 200),
            entry(6, "b" * 32, IMG, RTL, 503, error="model_load_failed", path="/v1/" + "p" * 200 + IMG),
            entry(7, "c" * 32, "team_a", IMG, 200, error="upstream_bad_response"),
            entry(8, "d" * 32, "team_a", "=HYPERLINK(\"http://x\")", 404, error="model_not_found"),
        ],
    }


def history(window, ttft_scale=1):
    """/ui/api/history: an hour of 10 s steps with some traffic at the end, overall and of "chat"; times to
    first token up to 171 ms times ttft_scale."""
    step, size = (10, 360) if window == "hour" else (300, 288)
    t = [NOW - step * (size - 1 - i) for i in range(size)]
    wave = [max(0.0, (i % 30) / 10 - 1) for i in range(size)]
    series = {"t": t, "requests_per_s": wave, "errors": [int(v > 1.5) for v in wave],
              "tokens_per_s": [v * 20 for v in wave], "ttft_p50_ms": [v * 40 * ttft_scale or None for v in wave],
              "ttft_p95_ms": [v * 90 * ttft_scale or None for v in wave], "queue_depth": [int(v) for v in wave]}
    return {"window": window, "step_s": step, "start": t[0], "series": {"*": series, "chat": series, IMG: series}}


class Stub:
    """The gateway's JSON as the test says it; the requests the page sent, in order. Requests to the paths in
    hold wait (in held) until release()."""

    def __init__(self, ttft_scale=1):
        self.state, self.down, self.sent, self.ttft_scale = state(), False, [], ttft_scale
        self.inflight = [{"handle": HANDLES[n], "request_id": CANCEL_ID, "client_id": f"team_{n}", "model": name,
                          "path": "/v1/chat/completions", "age_s": 12 - n, "chunks_sent": 7, "stream": True}
                         for n, name in enumerate((RTL, "chat"))]
        self.log_lines = ["main: server is listening on http://127.0.0.1:8081", f"load failed: {IMG} {RTL}"]
        self.hold, self.held = set(), []

    def answer(self, route):
        request = route.request
        url = urllib.parse.urlsplit(request.url)
        self.sent.append((request.method, url.path, request.post_data))
        if url.path in self.hold:
            return self.held.append(route)
        return self.respond(route, request, url)

    def release(self):
        """Answer the requests held, and hold no more."""
        self.hold.clear()
        for route in self.held:
            self.respond(route, route.request, urllib.parse.urlsplit(route.request.url))

    def respond(self, route, request, url):
        if self.down:
            return route.abort("connectionrefused")
        if url.path == "/ui/api/state":
            body = self.state
        elif url.path == "/ui/api/history":
            body = history(urllib.parse.parse_qs(url.query)["window"][0], self.ttft_scale)
        elif url.path == "/ui/api/inflight":
            body = {"data": self.inflight}
        elif url.path.endswith("/log"):
            body = {"model": urllib.parse.unquote(url.path.split("/")[4]), "lines": self.log_lines}
        elif url.path.endswith("/cancel"):
            self.inflight = [request for request in self.inflight if request["handle"] != url.path.split("/")[4]]
            body = {"cancelled": True}
        elif url.path == "/models/load":
            body = {"model": json.loads(request.post_data)["model"], "status": "loaded"}
        else:
            return route.fulfill(status=404, json={"error": {"message": "not stubbed", "code": "not_found"}})
        return route.fulfill(status=200, json=body)

    def count(self, suffix):
        """How many requests to a path ending so the page sent."""
        return len([sent for sent in self.sent if sent[1].endswith(suffix)])

    def wait_for(self, tab, suffix, count):
        """Run the page's timers on (its 2 s refreshes at once) until it has sent count requests to such a path."""
        for _ in range(WAIT_MS // 50):
            if self.count(suffix) >= count:
                return
            tab.clock.run_for(REFRESH_MS)
            tab.wait_for_timeout(50)  # the stub answers meanwhile
        raise AssertionError(f"the page sent {self.count(suffix)} requests to *{suffix}, not {count}")

    def posts(self, path):
        return [data for method, sent, data in self.sent if method == "POST" and sent == path]


@pytest.fixture(scope="module")
def shell():
    """A gateway serving the page and its files (its JSON is the stub's)."""
    app = create_app({**FAST_SETTINGS, **KEYS, "MODEL_UPSTREAMS": "chat=http://127.0.0.1:9"})
    with served(app) as url:
        yield url


@contextlib.contextmanager
def opened(chromium, url, width=1440, height=900, timezone="Asia/Kolkata", ttft_scale=1):
    """A signed-in tab on the stubbed page; fails on any script error, policy violation or native dialog."""
    context = chromium.new_context(viewport={"width": width, "height": height}, timezone_id=timezone)
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    problems = []
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.on("console", lambda message: "Content Security Policy" in message.text and problems.append(message.text))
    tab.on("dialog", lambda dialog: (problems.append(dialog.message), dialog.dismiss()))
    tab.clock.install(time=NOW * 1000)  # the page's timers run when the test says (and as time goes by)
    stub = Stub(ttft_scale)
    tab.route("**/ui/api/**", stub.answer)
    tab.route("**/models/load", stub.answer)
    sign_in(tab, url)
    tab.locator("#models tbody tr").first.wait_for()
    tab.locator("#charts canvas").first.wait_for()
    try:
        yield tab, stub
    finally:
        context.close()
    assert problems == []


def until(tab, check):
    """Let the page run until check() is true (at most WAIT_MS)."""
    for _ in range(WAIT_MS // 50):
        if check():
            return
        tab.wait_for_timeout(50)
    raise AssertionError("the page never got there")


def row_of(tab, table, text):
    return tab.locator(f"#{table} tbody tr").filter(has=tab.get_by_text(text, exact=True))


def test_hostile_names_are_text_everywhere_and_no_script_runs(browser, shell):
    with opened(browser, shell) as (tab, stub):
        row_of(tab, "models", IMG).wait_for()
        row_of(tab, "models", RTL_SHOWN).get_by_text(FAILURE).wait_for()
        row_of(tab, "clients", IMG).wait_for()
        row_of(tab, "inflight", RTL_SHOWN).wait_for()
        tab.locator("#life article").filter(has_text=RTL_SHOWN).wait_for()
        tab.locator("#recent tbody").get_by_text(f"POST /v1/{'p' * 200}{IMG}").wait_for()
        tab.locator("#charts-status").filter(has_text="").wait_for(state="attached")
        tab.locator("#chart-model option", has_text=IMG).wait_for(state="attached")
        row_of(tab, "models", RTL_SHOWN).get_by_role("button", name="Log").click()
        tab.locator("#log-lines").get_by_text(f"load failed: {IMG} {RTL_SHOWN}").wait_for()
        assert tab.locator("#log-title-name").inner_text() == RTL_SHOWN
        assert tab.evaluate("window.__pwned") is None
        assert tab.locator("img").count() == 0 and tab.locator("script").count() == 2  # uPlot's and the page's
        assert "\u202e" not in tab.evaluate("document.body.innerText")  # no override is obeyed anywhere


def test_long_names_never_push_the_tables_wider_than_the_screen(browser, shell):
    with opened(browser, shell) as (tab, stub):
        row_of(tab, "models", LONG).wait_for()
        for table in ("models", "clients", "recent", "inflight"):
            box = tab.evaluate(f"[document.querySelector('#{table}').parentElement.scrollWidth, "
                               f"document.querySelector('#{table}').parentElement.clientWidth]")
            assert box[0] <= box[1], table
        assert tab.evaluate("document.documentElement.scrollWidth") <= 1440
        name = row_of(tab, "models", LONG).locator(".name")
        assert name.get_attribute("title") == LONG  # the whole name, in the tooltip
        unload = row_of(tab, "models", LONG).locator("button[data-action=unload]")
        assert unload.bounding_box()["x"] + unload.bounding_box()["width"] <= 1440


def test_every_status_shows_what_the_model_is_doing_in_words(browser, shell):
    with opened(browser, shell) as (tab, stub):
        unloading = row_of(tab, "models", IMG)
        unloading.get_by_text("↓ unloading").wait_for()
        unloading.get_by_text("letting its requests finish, then stopping llama.cpp (2 in flight)").wait_for()
        row_of(tab, "models", LONG).get_by_text("↻ restarting").wait_for()
        chat = row_of(tab, "models", "chat")
        chat.get_by_text("restarted 2×; last exit: signal 9 (killed) at 2027-01-15 07:59:00 UTC").wait_for()
        card = tab.locator("#life article").filter(has=tab.get_by_role("heading", name="chat", exact=True))
        for fact in ("812 MiB", "4,096 tokens", "1 of 2", "2.4 s", "2027-01-15 07:50:00 UTC (10 min ago)",
                     "2027-01-15 08:14:30 UTC (in 15 min)", "3 conversations, 2,048 tokens, 6 MiB"):
            card.get_by_text(fact, exact=True).wait_for()
        long_card = tab.locator("#life article").filter(has_text=LONG)
        long_card.get_by_text("never: pinned").wait_for()
        assert row_of(tab, "models", IMG).locator("button[data-action=unload]").is_disabled()
        assert row_of(tab, "models", LONG).locator("button[data-action=load]").is_disabled()


def test_times_are_utc_with_the_date_or_local_and_the_request_id_shows(browser, shell):
    with opened(browser, shell, timezone="Asia/Kolkata") as (tab, stub):
        first = tab.locator(f"#recent tbody tr[data-request-id='{REQUEST_ID}']")
        first.get_by_text("2027-01-15 07:59:55 UTC", exact=True).wait_for()
        request_id = first.locator(".request-id")
        assert request_id.inner_text() == REQUEST_ID[:8] and request_id.get_attribute("title") == REQUEST_ID
        tab.get_by_label("Times").select_option("local")
        first.get_by_text("2027-01-15 13:29:55 UTC+05:30", exact=True).wait_for()
        assert "UTC+05:30" in tab.locator("#updated").inner_text()
        tab.get_by_label("Times").select_option("utc")
        first.get_by_text("2027-01-15 07:59:55 UTC", exact=True).wait_for()


def test_a_load_that_unloads_others_or_failed_last_time_asks_first_naming_them(browser, shell):
    with opened(browser, shell) as (tab, stub):
        dialog = tab.locator("#confirm-load")
        row_of(tab, "models", "embed").locator("button[data-action=load]").click()
        dialog.get_by_text("Loading it unloads these models to make room:").wait_for()
        assert dialog.locator("li").all_inner_texts() == ["chat", IMG]
        dialog.get_by_role("button", name="Do not load").click()
        tab.get_by_role("status").get_by_text("embed: not loaded.").wait_for()
        assert stub.posts("/models/load") == [] and not dialog.is_visible()
        row_of(tab, "models", RTL_SHOWN).locator("button[data-action=load]").click()
        dialog.get_by_text("Its last load failed:").wait_for()
        assert dialog.locator("li").all_inner_texts() == ["chat", FAILURE]
        assert RTL_SHOWN in tab.locator("#confirm-title").inner_text()
        dialog.get_by_role("button", name="Load anyway").click()
        tab.get_by_role("status").get_by_text(f"{RTL_SHOWN}: loaded").wait_for()
        assert [json.loads(body) for body in stub.posts("/models/load")] == [{"model": RTL}]
        row_of(tab, "models", "chat").locator("button[data-action=unload]").wait_for()  # no question for a model
        stub.state["models"][0]["status"] = "unloaded"  # that unloads nothing and has not failed
        stub.wait_for(tab, "/ui/api/state", stub.count("/ui/api/state") + 1)
        tab.locator("#models tbody tr[data-model=chat] button[data-action=load]:enabled").click()
        tab.get_by_role("status").get_by_text("chat: loaded").wait_for()
        assert not dialog.is_visible()


def test_cancel_names_the_gateways_handle_of_that_call_not_the_shared_request_id(browser, shell):
    with opened(browser, shell) as (tab, stub):
        request = row_of(tab, "inflight", RTL_SHOWN)
        request.get_by_text("12 s").wait_for()
        assert request.locator(".request-id").get_attribute("title") == CANCEL_ID  # the id is still what is shown
        request.get_by_role("button", name="Cancel").click()
        tab.get_by_role("status").get_by_text(f"Cancelled request {CANCEL_ID}.").wait_for()
        assert [sent for method, sent, _ in stub.sent if method == "POST"] == [f"/ui/api/requests/{HANDLES[0]}/cancel"]
        row_of(tab, "inflight", RTL_SHOWN).wait_for(state="detached")  # the other request with that id goes on:
        assert tab.locator("#inflight tbody tr").evaluate_all("rows => rows.map(r => r.dataset.handle)") == [HANDLES[1]]


def test_filters_and_the_csv_of_the_filtered_list(browser, shell):
    with opened(browser, shell) as (tab, stub):
        rows = tab.locator("#recent tbody tr")
        rows.nth(3).wait_for()
        tab.get_by_label("By client").select_option("team_a")
        tab.get_by_label("By status").select_option("failed")
        tab.locator("#recent-count").get_by_text("2 of 4").wait_for()
        assert rows.evaluate_all("rows => rows.map(r => r.dataset.requestId)") == ["c" * 32, "d" * 32]
        with tab.expect_download() as download:
            tab.get_by_role("button", name="Download CSV").click()
        lines = pathlib.Path(download.value.path()).read_text().splitlines()
        assert lines[0].startswith("time_utc,request_id,client_id,model,")
        assert [line.split(",")[1] for line in lines[1:]] == ["c" * 32, "d" * 32]
        assert lines[1].startswith("2027-01-15T07:59:53.000Z,") and f",{IMG}," in lines[1]
        assert ",\"'=HYPERLINK(\"\"http://x\"\")\"," in lines[2]  # a spreadsheet would run it: quoted, and '
        tab.get_by_label("By model").select_option(IMG)
        tab.locator("#recent-count").get_by_text("1 of 4").wait_for()


def test_the_log_panel_polls_while_open_and_stops_when_closed(browser, shell):
    with opened(browser, shell) as (tab, stub):
        row_of(tab, "models", "chat").get_by_role("button", name="Log").click()
        lines = tab.locator("#log-lines")
        lines.get_by_text("server is listening", exact=False).wait_for()
        stub.log_lines = stub.log_lines + ["slot 0: prompt processed"]
        stub.wait_for(tab, "/log", stub.count("/log") + 1)
        lines.get_by_text("slot 0: prompt processed", exact=False).wait_for()  # the next poll, 2 s later
        tab.get_by_role("button", name="Close the log").click()
        assert tab.locator("#log-panel").is_hidden() and lines.inner_text() == ""
        asked = stub.count("/log")
        stub.wait_for(tab, "/ui/api/state", stub.count("/ui/api/state") + 2)  # two refreshes later (4 s)
        assert stub.count("/log") == asked


def test_an_unreachable_gateway_dims_the_page_and_a_restart_is_noticed(browser, shell):
    with opened(browser, shell) as (tab, stub):
        stub.down = True
        stub.wait_for(tab, "/ui/api/state", stub.count("/ui/api/state") + 1)
        banner = tab.locator("#unreachable")
        banner.get_by_text("Gateway unreachable since").wait_for()
        assert " UTC (no answer)" in banner.inner_text()
        assert "stale" in tab.locator("#dashboard").get_attribute("class")
        assert tab.locator("#models").evaluate("t => getComputedStyle(t.closest('section')).opacity") == "0.45"
        stub.state["gateway"]["started_at"] = NOW + 5
        stub.down = False
        stub.wait_for(tab, "/ui/api/state", stub.count("/ui/api/state") + 1)
        tab.get_by_text("Gateway restarted at 2027-01-15 08:00:05 UTC: counts start again.").wait_for()
        assert banner.is_hidden() and "stale" not in tab.locator("#dashboard").get_attribute("class")


def test_sign_out_clears_every_table_card_chart_and_log_and_what_is_answered_after_it(browser, shell):
    with opened(browser, shell) as (tab, stub):
        row_of(tab, "models", "chat").get_by_role("button", name="Log").click()
        tab.locator("#log-lines").get_by_text("server is listening", exact=False).wait_for()
        tab.locator("#chart-model option", has_text=IMG).wait_for(state="attached")
        # A history and a Cancel on their way when the admin signs out: their answers come after it.
        stub.hold = {"/ui/api/history", f"/ui/api/requests/{HANDLES[0]}/cancel"}
        tab.locator("#chart-window").select_option("day")  # the history, at once
        row_of(tab, "inflight", RTL_SHOWN).get_by_role("button", name="Cancel").click()
        until(tab, lambda: len(stub.held) == 2)
        tab.get_by_role("button", name="Sign out").click()
        tab.locator("#sign-in").wait_for()
        finished = []
        tab.on("requestfinished", lambda request: finished.append(request.url))
        stub.release()
        until(tab, lambda: len(finished) == 2)
        # Nothing says that a page did nothing: it reads both answers (a task or two) meanwhile.
        tab.evaluate("() => new Promise((done) => setTimeout(done, 300))")
        assert tab.locator("#chart-model option").all_inner_texts() == ["every model"]
        assert tab.locator("#notice").inner_text() == ""
        html = tab.evaluate("document.body.outerHTML")
        for gone in (">chat<", "team_a", "gnp.exe", "onerror", REQUEST_ID[:8], CANCEL_ID, "server is listening"):
            assert gone not in html, gone
        assert tab.locator("tbody tr, #life *, #charts *, canvas").count() == 0
        assert tab.locator("#log-panel").is_hidden() and tab.evaluate("sessionStorage.length") == 0


def test_at_phone_width_every_column_is_in_reach_and_no_caption_or_label_is_clipped(browser, shell):
    with opened(browser, shell, width=390, height=844, ttft_scale=30) as (tab, stub):  # ttft up to 5130 ms
        row_of(tab, "models", LONG).wait_for()
        tab.locator("#inflight tbody tr").first.wait_for()
        assert tab.evaluate("document.documentElement.scrollWidth") <= 390
        out = tab.evaluate("""() => [...document.querySelectorAll('td, caption, .chart, .life, .filters > *')]
            .filter((node) => { const box = node.getBoundingClientRect();
                                return box.left < 0 || box.right > 390 || node.scrollWidth > node.clientWidth + 1; })
            .map((node) => `${node.tagName} ${node.dataset.label || node.className}`)""")
        assert out == []
        for table in ("models", "clients", "recent", "inflight"):  # each cell says its column, as a card
            labels = tab.locator(f"#{table} tbody tr").first.evaluate(
                "tr => [...tr.cells].map((td) => getComputedStyle(td, '::before').content)")
            heads = tab.locator(f"#{table} thead th").all_text_contents()
            assert labels == [json.dumps(head.strip()) for head in heads]
        row_of(tab, "models", LONG).locator("button[data-action=unload]").click(trial=True)  # in reach
        row_of(tab, "inflight", RTL_SHOWN).get_by_role("button", name="Cancel").click(trial=True)
        # A y label that does not fit its axis ("4000 ms") is cut at the canvas's left edge: no ink may be there.
        tab.locator("#chart-ttft .summary").get_by_text("highest 5130 ms", exact=False).wait_for()
        assert tab.locator("#chart-ttft canvas").evaluate("""(canvas) => canvas.getContext("2d")
            .getImageData(0, 0, 2, canvas.height).data.filter((value, i) => i % 4 === 3 && value > 0).length""") == 0
