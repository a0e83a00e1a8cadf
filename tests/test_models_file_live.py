"""The models file applied live, end to end: bin/serve with the stand-in llama-server (tests/fake_llama_server.py)
reloads on POST /models/reload, on SIGHUP and when the file changes; streams in flight finish; a removed model takes
no new request, an added one answers, a changed one restarts with its new command line once idle; a broken file
changes nothing."""
import json
import os
import re
import signal
import time

import pytest
import requests

from tests import fake_llama_server as stand_in
from tests.processes import ServeProcess, posix_only

ADMIN_HEADERS = {"Authorization": f"Bearer {stand_in.ADMIN}"}
# Every version of a file is padded to this size, so that a version written unseen (below) differs from the last in
# neither size nor modification time.
FILE_SIZE = 2048


@pytest.fixture
def box(tmp_path, monkeypatch):
    """A Box; the test run's own model settings are kept from bin/serve (ServeProcess passes os.environ on)."""
    for name in stand_in.MODEL_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return stand_in.Box(tmp_path)


@pytest.fixture
def start(box):
    """start(**env): bin/serve on the box, stopped at the end; a failing test shows what it logged."""
    started = []

    def run(**env):
        """Start one with env on top of the box's."""
        started.append(ServeProcess(**box.env(**env)))
        return started[-1]

    yield run
    for serve in started:
        serve.stop()
        print("bin/serve logged:\n" + serve.output(5)[-8000:])


def models_file(source, **models) -> str:
    """A models file of the given models (name -> extra TOML lines), each on source."""
    return "".join(f"[models.{name}]\nsource = {stand_in.quoted(source)}\n{extra}\n\n"
                   for name, extra in models.items())


def write(path, text, unseen=False):
    """Write a version of the models file. unseen: keep the last version's size and times, so that the watcher
    (which looks at those) cannot tell, and the reload a test makes itself is the one that applies it."""
    payload = text.encode()
    assert len(payload) < FILE_SIZE
    before = os.stat(path) if unseen else None
    path.write_bytes(payload + b"\n" + b"#" * (FILE_SIZE - len(payload) - 1))
    if before is not None:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def model_ids(serve) -> list:
    """The ids /v1/models lists, sorted."""
    return sorted(model["id"] for model in requests.get(serve.url + "/v1/models", timeout=10).json()["data"])


def chat(serve, model, **fields) -> requests.Response:
    """A chat request for model."""
    return requests.post(serve.url + "/v1/chat/completions", timeout=30, stream=fields.get("stream", False), json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **fields})


def logged(serve) -> str:
    """The lines bin/serve has logged so far, for a failure message."""
    while not serve.lines.empty():
        line = serve.lines.get_nowait()
        serve.seen += [line] if line is not None else []
    return "\n".join(serve.seen[-40:])


def wait_until(check, timeout, what, serve=None):
    """Poll check until it is true; fail naming what (and showing what serve logged) after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}; bin/serve logged:\n{logged(serve)}" if serve else what)
        time.sleep(0.1)


def ended(process) -> bool:
    """A stand-in has ended: it recorded SIGTERM, or it no longer runs (Windows ends it without a signal)."""
    return process["exited"] is not None or not stand_in.pid_alive(process["pid"])


def content_chunks(lines) -> int:
    """The content deltas among a chat stream's lines."""
    chunks = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]
    return sum(1 for chunk in chunks for choice in chunk.get("choices", ()) if choice["delta"].get("content"))


def strings(value):
    """Every string in a JSON value."""
    if isinstance(value, str):
        yield value
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        yield from strings(item)


STREAMED = 40  # tokens per stream, FAKE_LLAMA_DELAY_S apart: long enough for a reload to happen meanwhile


def test_a_reload_adds_removes_and_changes_models_while_their_streams_finish(box, start, demo_model_path):
    write(box.file, models_file(demo_model_path, keep="", gone="", change='args = ["--jinja"]'))
    serve = start(FAKE_LLAMA_DELAY_S="0.1")
    try:
        serve.wait_for_event("ready")
        streams = {}
        for name in ("keep", "gone", "change"):
            response = chat(serve, name, stream=True, max_tokens=STREAMED)
            assert response.status_code == 200, response.text
            lines = response.iter_lines(decode_unicode=True)
            streams[name] = (response, lines, [next(line for line in lines if line)])  # under way
        write(box.file, models_file(demo_model_path, keep="", change='args = ["--jinja", "--swa-full"]', new=""),
              unseen=True)
        reload = requests.post(serve.url + "/models/reload", headers=ADMIN_HEADERS, timeout=30)
        reloaded_at = time.time()
        assert reload.status_code == 200, reload.text
        assert {key: reload.json()[key] for key in ("added", "removed", "changed", "updated")} == {
            "added": ["new"], "removed": ["gone"], "changed": ["change"], "updated": []}
        gone = chat(serve, "gone")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        assert chat(serve, "new").status_code == 200
        assert model_ids(serve) == ["change", "keep", "new"]
        for name, (response, lines, seen) in streams.items():
            seen += [line for line in lines if line]
            response.close()
            assert seen[-1] == "data: [DONE]" and content_chunks(seen) == STREAMED, name  # whole
        assert chat(serve, "change").status_code == 200  # on its new llama-server, once the old one was idle
        wait_until(lambda: all(ended(process) for process in box.processes("gone")), 10,
                   "gone's llama-server runs on", serve)
        wait_until(lambda: ended(box.processes("change")[0]), 10, "change's old llama-server runs on", serve)
        processes = {name: box.processes(name) for name in ("keep", "gone", "change", "new")}
    finally:
        assert serve.stop() == 0
    for name in ("keep", "gone", "change"):
        stream, = processes[name][0]["streams"]
        assert stream["stream"] == "last" and stream["time"] > reloaded_at, name  # in flight across the reload
    assert len(processes["keep"]) == 1 and len(processes["gone"]) == 1 and len(processes["new"]) == 1
    old, new = processes["change"]
    assert old["argv"][-1] == "--jinja" and new["argv"][-2:] == ["--jinja", "--swa-full"]  # the new command line
    assert new["started"] > old["streams"][0]["time"]  # started once the old one had finished its stream
    assert [path for path, _ in old["bodies"]] == ["/v1/chat/completions"]  # the stream alone
    assert [body["max_tokens"] for _, body in new["bodies"]] == [1]  # the request after the reload
    assert [body["max_tokens"] for _, body in processes["new"][0]["bodies"]] == [1]


def test_a_broken_file_changes_nothing_and_an_edit_is_picked_up_by_the_watcher(box, start, demo_model_path):
    write(box.file, models_file(demo_model_path, a="", b=""))
    serve = start()
    try:
        serve.wait_for_event("ready")
        write(box.file, "[models.a]\nsource = " + stand_in.quoted(demo_model_path) + "\nctx = \n")
        refused = requests.post(serve.url + "/models/reload", headers=ADMIN_HEADERS, timeout=30)
        assert refused.status_code == 400 and "error" in refused.json(), refused.text
        where = f"{box.file}:3: "
        assert any(where in text for text in strings(refused.json())), refused.text
        serve.wait_for(re.escape(json.dumps(where)[1:-1]))  # and a log line says it
        assert model_ids(serve) == ["a", "b"]
        assert chat(serve, "b").status_code == 200
        assert len(box.processes()) == 2  # neither restarted nor stopped
        write(box.file, models_file(demo_model_path, a="", b="", c=""))
        later = time.time() + 2  # an edit seconds later, as a person makes it (some file systems keep 2 s mtimes)
        os.utime(box.file, (later, later))
        wait_until(lambda: "c" in model_ids(serve), 10, "the watcher never applied the edited file", serve)
        assert chat(serve, "c").status_code == 200
        assert model_ids(serve) == ["a", "b", "c"]
    finally:
        assert serve.stop() == 0
    assert [len(box.processes(name)) for name in ("a", "b", "c")] == [1, 1, 1]


@posix_only
def test_sighup_reloads_the_file(box, start, demo_model_path):
    write(box.file, models_file(demo_model_path, a=""))
    serve = start()
    try:
        serve.wait_for_event("ready")
        write(box.file, models_file(demo_model_path, a="", b=""), unseen=True)
        time.sleep(2)  # the watcher's turns (about one a second) pass the unseen version by
        assert model_ids(serve) == ["a"]
        serve.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "b" in model_ids(serve), 10, "SIGHUP did not reload the file", serve)
        assert chat(serve, "b").status_code == 200
    finally:
        assert serve.stop() == 0
