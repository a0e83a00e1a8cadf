"""bin/pull on its own, as a user runs it, against the local stand-in of the Hub: what it fetches, prints and
logs, the one line each failure ends with, and what a killed fetch leaves behind."""
import glob
import json
import os
import signal
import subprocess
import sys

import pytest

from service.llama.launch import model_traits
from service.models.demo_model import CONTEXT_LENGTH
from service.models.model_file import model_files
from tests.fake_hub import LISTING, RESOLVE, FakeHub, demo_gguf
from tests.processes import ROOT, _ctrl_c_as_at_a_terminal, posix_only

PULL = os.path.join(ROOT, "bin", "pull")
# Any request that is not to the local host goes to this proxy, where nothing listens: nothing reaches the internet.
NO_INTERNET = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "ALL_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost"}


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> bytes:
    """A real GGUF's bytes."""
    return demo_gguf(tmp_path_factory)


@pytest.fixture
def hub(gguf):
    """The stand-in Hub: a public repo, a gated one (token "granted" may read it) and a private one."""
    stand_in = FakeHub()
    stand_in.add_repo("acme/tiny-GGUF", {"tiny-Q4_K_M.gguf": gguf, "tiny-Q8_0.gguf": gguf})
    stand_in.add_repo("acme/gated-GGUF", {"gated-Q4_K_M.gguf": gguf}, gated=True, tokens=("granted",))
    stand_in.add_repo("acme/private-GGUF", {"private-Q4_K_M.gguf": gguf}, private=True, tokens=("granted",))
    yield stand_in
    stand_in.stop()


@pytest.fixture
def pull(hub, tmp_path):
    """Run bin/pull with the environment a user would give it, pointed at the stand-in."""
    models_dir = str(tmp_path / "models")

    def run(*specs, background=False, **env):
        environment = {key: value for key, value in os.environ.items()
                       if not key.startswith("HF_") and key.upper() not in NO_INTERNET}
        environment.update(NO_INTERNET, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), MODELS_DIR=models_dir,
                           LOG_FORMAT="json", PYTHONUNBUFFERED="1")
        environment.update(env)
        command = [sys.executable, PULL, *specs]
        if background:
            return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=_ctrl_c_as_at_a_terminal if os.name == "posix" else None)
        return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)

    run.models_dir = models_dir
    return run


def events(stderr) -> list:
    """bin/pull's log lines, every one a JSON object."""
    return [json.loads(line) for line in stderr.splitlines()]


def test_pull_fetches_a_model_logs_its_progress_and_prints_where_it_is_kept(pull, hub, gguf):
    done = pull("hf:acme/tiny-GGUF")
    path = os.path.join(pull.models_dir, "tiny-Q4_K_M.gguf")
    assert (done.returncode, done.stdout) == (0, path + "\n"), done.stderr
    logged = events(done.stderr)
    progress = [(line["file"], line["percent"]) for line in logged if line["event"] == "download"]
    assert progress[0] == ("tiny-Q4_K_M.gguf", 0) and progress[-1] == ("tiny-Q4_K_M.gguf", 100)
    assert [line["path"] for line in logged if line["event"] == "model fetched"] == [path]
    assert model_traits(path)["trained_ctx"] == CONTEXT_LENGTH  # a whole GGUF
    assert all(LISTING.fullmatch(r.path) or RESOLVE.fullmatch(r.path) for r in hub.requests)  # no telemetry
    assert [model.path for model in model_files(pull.models_dir)] == [path]

    hub.stop()  # later, with no network: the kept copy, and a warning
    again = pull("acme/tiny-GGUF")  # hf: may be left out
    assert (again.returncode, again.stdout) == (0, path + "\n"), again.stderr
    assert "hub unreachable: serving the kept copy" in [line["event"] for line in events(again.stderr)]


# Each failure: what bin/pull is given, and the one line it ends with ({url}: the stand-in, {models}: MODELS_DIR).
FAILURES = [
    ("hf:acme/nope-GGUF", {}, "error: hf:acme/nope-GGUF: no repo acme/nope-GGUF on {url}, or it is private: check "
                              "the name, or set HF_TOKEN to a token that may read it"),
    ("hf:acme/private-GGUF", {}, "error: hf:acme/private-GGUF: no repo acme/private-GGUF on {url}, or it is private: "
                                 "check the name, or set HF_TOKEN to a token that may read it"),
    ("hf:acme/gated-GGUF", {}, "error: hf:acme/gated-GGUF: acme/gated-GGUF is gated: accept its terms at "
                               "{url}/acme/gated-GGUF, then set HF_TOKEN to a read token of that account"),
    ("hf:acme/gated-GGUF", {"HF_TOKEN": "hf_secret_refused"},
     "error: hf:acme/gated-GGUF: acme/gated-GGUF is gated and HF_TOKEN's account may not read it yet: accept its terms "
     "at {url}/acme/gated-GGUF"),
    ("hf:acme/tiny-GGUF:Q2_K", {}, "error: hf:acme/tiny-GGUF has no GGUF file for Q2_K; its quants: Q4_K_M, Q8_0 "
                                   "(name one as hf:acme/tiny-GGUF:Q4_K_M)"),
    ("hf:acme/tiny-GGUF", {"HF_ENDPOINT": "http://127.0.0.1:9"},  # no network
     "error: hf:acme/tiny-GGUF: cannot reach http://127.0.0.1:9, and no copy is kept in {models}: connect to the "
     "network (or set HF_ENDPOINT to a mirror), or copy the model there"),
    ("hf:acme/tiny-GGUF", {"HF_HUB_OFFLINE": "1"}, "error: hf:acme/tiny-GGUF: HF_HUB_OFFLINE is set and no copy is "
                                                   "kept in {models}: unset it to fetch the model, or fetch it with "
                                                   "bin/pull first"),
]


def test_each_failure_is_one_line_and_a_non_zero_exit(pull, hub):
    runs = [pull(spec, background=True, **env) for spec, env, _ in FAILURES]  # side by side: each takes a while
    for run, (spec, env, line) in zip(runs, FAILURES):
        stdout, stderr = run.communicate(timeout=60)
        assert (run.returncode, stdout) == (1, ""), (spec, env, stderr)
        assert stderr.splitlines()[-1] == line.format(url=hub.url, models=pull.models_dir), (spec, env)
        assert "Traceback" not in stderr and "secret" not in stderr, (spec, env, stderr)
        assert all(json.loads(logged) for logged in stderr.splitlines()[:-1]), (spec, env, stderr)
    assert glob.glob(os.path.join(pull.models_dir, "**", "*.gguf"), recursive=True) == []


def test_a_token_that_may_read_opens_gated_and_private_repos(pull):
    done = pull("hf:acme/gated-GGUF", "hf:acme/private-GGUF", HF_TOKEN="granted")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [os.path.join(pull.models_dir, name)
                                        for name in ("gated-Q4_K_M.gguf", "private-Q4_K_M.gguf")]


def test_a_killed_pull_leaves_no_model_and_the_next_one_completes(pull, hub, gguf):
    hub.stall("tiny-Q4_K_M.gguf", after=len(gguf) // 2)
    killed = pull("hf:acme/tiny-GGUF", background=True)
    assert hub.stalled.wait(30), "bin/pull never began the download"
    killed.kill()
    killed.communicate(timeout=30)
    partials = glob.glob(os.path.join(pull.models_dir, ".cache", "huggingface", "download", "*.incomplete"))
    assert len(partials) == 1  # set aside, where no start looks for models
    assert glob.glob(os.path.join(pull.models_dir, "*.gguf")) == []
    assert [model.source for model in model_files(pull.models_dir)] == ["demo"]
    hub.release.set()
    done = pull("hf:acme/tiny-GGUF")
    assert done.returncode == 0, done.stderr
    with open(done.stdout.strip(), "rb") as fetched:
        assert fetched.read() == gguf


@posix_only
def test_ctrl_c_stops_a_pull_with_one_line_and_nothing_partial(pull, hub, gguf):
    hub.stall("tiny-Q4_K_M.gguf", after=len(gguf) // 2)
    stopped = pull("hf:acme/tiny-GGUF", background=True)
    assert hub.stalled.wait(30), "bin/pull never began the download"
    stopped.send_signal(signal.SIGINT)
    stdout, stderr = stopped.communicate(timeout=30)
    assert (stopped.returncode, stdout) == (130, "")
    assert stderr.splitlines()[-1] == "error: interrupted; files fetched whole are kept: run it again for the rest"
    assert "Traceback" not in stderr
    left = [name for _, _, names in os.walk(pull.models_dir) for name in names
            if name.endswith((".gguf", ".incomplete"))]
    assert left == []
