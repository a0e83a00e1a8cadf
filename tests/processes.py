"""Processes tests start: bin/serve (and bin/serve-llama) as a child with its output read as it comes, and small
supervised llama.cpp servers."""
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from service.llama.supervisor import LlamaSupervisor, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = os.path.join(ROOT, "bin", "serve")


def _ctrl_c_as_at_a_terminal():
    # A test run started in the background (nohup, `&` in a script) ignores SIGINT, and its children inherit
    # that: bin/serve would ignore Ctrl-C too. Restore the default, as a shell does for a foreground program.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ServeProcess:
    """bin/serve running as a child of the test, with its stderr lines collected as they come."""

    def __init__(self, script=SERVE, with_stdout=False, **env):
        self.port = free_port()
        environment = {**os.environ, "API_PORT": str(self.port), "PYTHONUNBUFFERED": "1", **env}
        # with_stdout: its stdout too, in the same stream of lines.
        self.process = subprocess.Popen([sys.executable, script], env=environment, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE if with_stdout else subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT if with_stdout else subprocess.PIPE, text=True,
                                        preexec_fn=_ctrl_c_as_at_a_terminal if os.name == "posix" else None)
        self.lines = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr or self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _lines(self, timeout):
        """Yield stderr lines as they come, until the process ends or timeout passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                return
            self.seen.append(line)
            yield line

    def wait_for_event(self, event, timeout=60) -> dict:
        """Return the first JSON log line whose event is event; every line before it must be JSON too."""
        for line in self._lines(timeout):
            entry = json.loads(line)  # every line bin/serve writes to a pipe is a JSON object
            if entry["event"] == event:
                return entry
        pytest.fail(f"bin/serve never logged {event!r}; it printed:\n" + "\n".join(self.seen))

    def wait_for(self, pattern, timeout=60) -> re.Match:
        """Return the first stderr line matching pattern; fail if the process ends or time runs out first."""
        for line in self._lines(timeout):
            match = re.search(pattern, line)
            if match:
                return match
        pytest.fail(f"bin/serve never printed {pattern!r}; it printed:\n" + "\n".join(self.seen))

    def output(self, timeout=20) -> str:
        """Everything it printed, once it has ended."""
        for _ in self._lines(timeout):
            pass
        return "\n".join(self.seen)

    @property
    def url(self):
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig=signal.SIGTERM, timeout=20) -> int:
        """Send sig unless it has ended already; return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


posix_only = pytest.mark.skipif(os.name != "posix", reason="uses POSIX signals and /proc")


def start_llama(path):
    """A supervised llama.cpp on path: one thread, small context, embeddings on."""
    return LlamaSupervisor(path, ctx=1024, parallel=2, threads=1, startup_timeout=60).start()


def llama_metric(llama, name) -> float:
    """One of the upstream's own llamacpp:* metrics, from its /metrics."""
    for line in requests.get(llama.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in llama.cpp's /metrics")


def wait_processing(llama, expected, timeout) -> float:
    """Seconds until llamacpp:requests_processing equals expected; fails after timeout."""
    started = time.monotonic()
    while llama_metric(llama, "llamacpp:requests_processing") != expected:
        assert time.monotonic() - started < timeout, f"requests_processing never became {expected}"
        time.sleep(0.05)
    return time.monotonic() - started


# ignore_eos: nothing but max_tokens (or a cut) ends it; the prompt and all of it fit the slot's context.
LONG = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True}
