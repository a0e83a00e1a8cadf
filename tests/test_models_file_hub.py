"""A vision model from the Hub end to end (issue 21, item 3): bin/serve with a models file naming an hf: repo that
holds a model and its projectors, against the local stand-in of the Hub (fake_hub.py) and the stand-in
llama-server (fake_llama_server.py): both files are fetched and kept, the F16 projector is passed, the model is
listed as taking images, an image part reaches llama.cpp unchanged, and a restart with the Hub gone asks it
nothing and runs the same command line."""
import base64
import hashlib
import json
import os

import pytest
import requests

from tests import fake_llama_server as stand_in
from tests.fake_hub import FakeHub, demo_gguf, vision_repo
from tests.processes import ServeProcess

VISION = "acme/vision-GGUF"
PROJECTORS = "mmproj-acme--vision-GGUF"  # the folder in MODELS_DIR where the repo's projectors are kept
# Any request not to the local host goes to this proxy, where nothing listens: nothing reaches the internet.
NO_INTERNET = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "ALL_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost"}
# A 1x1 PNG as a data URL, as OpenAI's clients send an image they hold.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5Er"
                       "kJggg==")
IMAGE_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The vision repo's files: vision-Q4_K_M.gguf (a real model), mmproj-model-f16.gguf, mmproj-model-q8_0.gguf."""
    return vision_repo(demo_gguf(tmp_path_factory), tmp_path_factory)


@pytest.fixture
def hub(files):
    """The stand-in Hub serving the vision repo."""
    served = FakeHub()
    served.add_repo(VISION, files)
    yield served
    served.stop()


@pytest.fixture
def box(tmp_path, monkeypatch):
    """A Box whose bin/serve gets none of the test run's model, Hub or proxy settings (ServeProcess passes
    os.environ on), and a Hub home of its own: no token file, no cache of the user's."""
    proxies = {name.lower() for name in NO_INTERNET}
    for name in [name for name in os.environ if name in stand_in.MODEL_SETTINGS or name.upper().startswith("HF_")
                 or name.lower() in proxies]:
        monkeypatch.delenv(name)
    return stand_in.Box(tmp_path)


def hub_env(box, hub_url) -> dict:
    """bin/serve's environment on box, with the Hub at hub_url and offline mode off: only the kept copies keep
    a restart from asking it."""
    return box.env(HF_ENDPOINT=hub_url, HF_HUB_OFFLINE="0", HF_HOME=str(box.root / "hf-home"),
                   HF_HUB_DISABLE_TELEMETRY="1", **NO_INTERNET)


def served(box, hub_url) -> tuple:
    """Run bin/serve on box until ready, list its models and send one chat with an image part; return its log
    lines (parsed), the model list and the chat sent, once it has stopped."""
    serve = ServeProcess(**hub_env(box, hub_url))
    try:
        serve.wait_for_event("ready", timeout=60)
        listed = requests.get(serve.url + "/v1/models", timeout=10)
        sent = {"model": "eye", "max_tokens": 4, "messages": [
            {"role": "system", "content": "Describe images."},
            {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                         {"type": "image_url", "image_url": {"url": IMAGE_URL, "detail": "low"}}]}]}
        answer = requests.post(serve.url + "/v1/chat/completions", json=sent, timeout=20)
    finally:
        assert serve.stop() == 0
    serve.output()  # its lines to the end, the request's and the shutdown's too
    assert listed.status_code == 200, listed.text
    assert answer.status_code == 200, answer.text
    return [json.loads(line) for line in serve.seen], listed.json()["data"], sent


def fetched(hub) -> list:
    """The repo files the stand-in Hub sent (GETs), in order."""
    return [r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]


def warnings(logged) -> list:
    """The events of the warning and error lines, but the one that says no API key is set (none is, here)."""
    return [line["event"] for line in logged if line.get("level") in ("warning", "error")
            and not line["event"].startswith("open access")]


def without_port(argv) -> list:
    """argv with the value of --port blanked: each start may give the model another free port."""
    return [("PORT" if index and argv[index - 1] == "--port" else token) for index, token in enumerate(argv)]


def test_auto_fetches_and_passes_the_f16_projector_an_image_arrives_unchanged_and_a_restart_asks_no_hub(box, hub,
                                                                                                        files):
    box.file.write_text(f'[models.eye]\nsource = "hf:{VISION}"\nmmproj = "auto"\n')

    logged, listed, sent = served(box, hub.url)

    assert fetched(hub) == ["vision-Q4_K_M.gguf", "mmproj-model-f16.gguf"]  # the F16 one, never the Q8_0 one
    process, = box.processes()
    argv = process["argv"]
    model, projector = stand_in.flag(argv, "--model"), stand_in.flag(argv, "--mmproj")
    assert projector == str(box.models_dir / PROJECTORS / "mmproj-model-f16.gguf")
    assert os.path.dirname(os.path.abspath(model)) == str(box.models_dir)  # kept in MODELS_DIR, the projector in
    # a folder of its repo's beside it
    for path, name in ((model, "vision-Q4_K_M.gguf"), (projector, "mmproj-model-f16.gguf")):
        with open(path, "rb") as kept:  # the Hub's bytes, whole (hashed: a failure prints no megabyte)
            assert hashlib.sha256(kept.read()).digest() == hashlib.sha256(files[name]).digest(), name
    assert argv.count("--mmproj") == 1 and stand_in.flag(argv, "--alias") == "eye"
    assert [(entry["id"], entry.get("capabilities")) for entry in listed] == [("eye", ["vision"])]
    (path, body), = process["bodies"]
    assert path == "/v1/chat/completions"
    assert body["messages"] == sent["messages"]  # the image part as the client sent it, data URL and all
    assert body["messages"][1]["content"][1]["image_url"]["url"] == IMAGE_URL
    assert warnings(logged) == []

    # A restart with the Hub gone, offline mode off: the kept copies are found without asking it.
    hub.stop()
    logged, listed, sent = served(box, hub.url)
    kept = {line["event"]: line.get("path") for line in logged if line["event"] in ("model kept", "projector kept")}
    assert kept == {"model kept": model, "projector kept": projector}  # found, so the Hub was never asked
    assert warnings(logged) == []  # none of "hub unreachable: serving the kept copy"
    _, again = box.processes()
    assert without_port(again["argv"]) == without_port(argv)
    assert [(entry["id"], entry.get("capabilities")) for entry in listed] == [("eye", ["vision"])]
    (_, body), = again["bodies"]
    assert body["messages"] == sent["messages"]
