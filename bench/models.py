"""bin/bench's models-on-demand rounds (issue 11), on two demo models behind one gateway with MODELS_MAX_LOADED=1:

- cold request: a request for a model when none is loaded, end to end, against llama.cpp's own load time for that
  model: the load the gateway timed for that very request, and llama.cpp started directly by a supervisor built
  as the gateway builds its own (interleaved with the cold requests); also a swap request (the other model is
  loaded and must be stopped first);
- swap under load: two clients, one per model, back to back: every request makes a swap; none may fail.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import requests

from service.config import load_settings
from service.llama.launch import supervisor_for
from service.llama.supervisor import free_port
from service.models.demo_model import write_demo_model
from service.models.spec import ModelSpec
from service.paths import PROJECT_ROOT

NAMES = ("a", "b")
ADMIN_KEY = "bench-admin-key"
# llama.cpp's settings, the same for the gateway's children and the direct loads (both built by supervisor_for).
LLAMA_ENV = {"LLAMA_CTX": "2048", "LLAMA_PARALLEL": "1", "LLAMA_THREADS": "1"}
# A short answer: a cold request's time is then the load and the gateway, hardly generation.
MAX_TOKENS = 4
COLD_GOAL_MS = 50.0
# Failures printed at most (all are counted).
SHOWN_FAILURES = 10


def chat_body(name) -> dict:
    """The round's request for model name."""
    return {"model": name, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": MAX_TOKENS}


def gateway_env(paths, key, port) -> dict:
    """bin/serve's environment: both models on demand, one loaded at a time, the admin routes on."""
    return {**LLAMA_ENV, "MODEL_PATHS": ",".join(f"{name}={path}" for name, path in paths.items()),
            "MODELS_MAX_LOADED": "1", "ADMIN_API_KEY": ADMIN_KEY, "OPENAI_API_KEY": key, "API_PORT": str(port),
            "RATE_LIMIT_RPM": "100000000", "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "WAITRESS_THREADS": "8"}


def direct_load(supervisor, name) -> tuple:
    """One start of llama.cpp by the model's own supervisor, as the gateway starts it (start(): spawn to /health
    200), and the fresh llama.cpp's first answer, sent to it directly: (load seconds, answer seconds)."""
    started = time.perf_counter()
    supervisor.start()
    try:
        load = time.perf_counter() - started
        started = time.perf_counter()
        requests.post(supervisor.url + "/v1/chat/completions", json=chat_body(name), timeout=60).raise_for_status()
        return load, time.perf_counter() - started
    finally:
        supervisor.stop()


def ready_time(supervisor) -> float:
    """Seconds from spawning the supervisor's command to its /health 200, polled every 5 ms: llama.cpp's load
    without the supervisor's poll schedule (which backs off to 250 ms between polls)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    child = subprocess.Popen(supervisor.command(), env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _answers(supervisor.url + "/health"):
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("models round: llama.cpp did not start")
            time.sleep(0.005)
        return time.perf_counter() - started
    finally:
        child.terminate()
        child.wait(10)
        child.stdin.close()


class ModelEvents:
    """The gateway's "model loaded" and "model unloaded" log lines (JSON), read from its log file."""

    def __init__(self, path):
        self.path = path

    def read(self) -> list:
        """Every load and unload logged so far, in order: dicts with event, model, reason and duration_s."""
        events = []
        with open(self.path, encoding="utf-8", errors="replace") as log:
            for line in log:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # llama.cpp's own output, or a line being written
                if isinstance(record, dict) and record.get("event") in ("model loaded", "model unloaded"):
                    events.append(record)
        return events

    def logged(self, start, count) -> list:
        """The count events logged after the first start ones; raise if the gateway has not logged them all."""
        found = self.wait(start + count)[start:]
        if len(found) < count:
            raise RuntimeError(f"models round: the gateway logged {len(found)} model loads and unloads where "
                               f"{count} were expected; see {self.path}")
        return found[:count]

    def wait(self, count, timeout=30.0) -> list:
        """The events once at least count have been logged (each is written just after its load or unload ends,
        so possibly after the request it served was answered)."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.read()
            if len(events) >= count or time.monotonic() > deadline:
                return events
            time.sleep(0.02)


@contextmanager
def serving(env, log, start_wait_s=60.0):
    """bin/serve with env (API_PORT set), its output into the open file log, until the block ends; yields its URL
    once /health answers 200 (within start_wait_s)."""
    url = f"http://127.0.0.1:{env['API_PORT']}"
    gateway = subprocess.Popen([sys.executable, "bin/serve"], env={**os.environ, **env}, cwd=PROJECT_ROOT,
                               stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + start_wait_s
        while not _answers(url + "/health"):
            if gateway.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start; see {log.name}")
            time.sleep(0.02)
        yield url
    finally:
        gateway.terminate()
        gateway.wait(30)


def _answers(url) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


class Client:
    """One client of the gateway: a connection, its key, timed chat requests and admin calls."""

    def __init__(self, url, key):
        self.url, self.session = url, requests.Session()
        self.headers = {"Authorization": f"Bearer {key}"}

    def chat(self, name) -> tuple:
        """Send the round's request for model name; (seconds, None) when answered, else (seconds, why not)."""
        started = time.perf_counter()
        try:
            response = self.session.post(self.url + "/v1/chat/completions", json=chat_body(name),
                                         headers=self.headers, timeout=300)
        except requests.RequestException as error:
            return time.perf_counter() - started, f"{name}: {type(error).__name__}"
        took = time.perf_counter() - started
        if response.status_code == 200:
            return took, None
        try:
            error = response.json()["error"]
            detail = f"{error.get('code') or error.get('type')}: {str(error.get('message'))[:120]}"
        except (ValueError, KeyError, TypeError, AttributeError):
            detail = response.text[:120]
        return took, f"{name}: {response.status_code} {detail}"

    def timed_chat(self, name) -> float:
        """The seconds the request for model name took; raise if it failed (the cold round allows none)."""
        took, failure = self.chat(name)
        if failure:
            raise RuntimeError(f"models round: {failure}")
        return took

    def admin(self, action, name):
        """POST /models/{action} for name with the admin key; returns once done (the route waits)."""
        self.session.post(f"{self.url}/models/{action}", json={"model": name},
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=300).raise_for_status()

    def unloads_total(self) -> float:
        """gateway_model_unloads_total summed over models and reasons, from /metrics."""
        text = self.session.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("gateway_model_unloads_total{"))


def cold_round(client, events, supervisor, runs) -> dict:
    """Cold requests through the gateway with nothing loaded (the model admin-unloaded after each), each followed
    by a warm one; interleaved with llama.cpp started directly by supervisor (the same flags), so that both see
    the machine alike. Then swap requests (alternating models: each unloads the other first). Medians, in ms."""
    client.timed_chat(NAMES[0])  # the gateway's own first-request costs are not a model's
    client.admin("unload", NAMES[0])
    events.logged(0, 2)  # that load and that unload
    samples = {figure: [] for figure in ("llama_load", "llama_ready", "llama_first_answer", "cold", "warm")}
    for run in range(runs):
        load, answer = direct_load(supervisor, NAMES[0])
        samples["llama_load"].append(load)
        samples["llama_first_answer"].append(answer)
        samples["llama_ready"].append(ready_time(supervisor))
        name = NAMES[run % 2]
        samples["cold"].append(client.timed_chat(name))
        samples["warm"].append(client.timed_chat(name))
        client.admin("unload", name)
    logged = events.logged(2, 2 * runs)  # a load and an unload each
    # Each cold request's own load, as the gateway timed it: its supervisor's start(), as the direct loads are.
    samples["own_load"] = [event["duration_s"] for event in logged if event["event"] == "model loaded"]
    client.timed_chat(NAMES[0])
    swap = [client.timed_chat(NAMES[(run + 1) % 2]) for run in range(runs)]
    logged = events.logged(2 + 2 * runs, 1 + 2 * runs)[1:]  # the first load, then an unload and a load each
    figures = {f"{figure}_ms": _ms(statistics.median(values)) for figure, values in samples.items()}
    figures.update({
        "runs": runs,
        # The goal figure, per request: free of the load's run-to-run spread, which the supervisor's /health poll
        # steps (0.30 s, 0.55 s, 0.80 s, ...) make up to 250 ms wide.
        "added_ms": _ms(statistics.median(c - own for c, own in zip(samples["cold"], samples["own_load"]))),
        "cold_minus_llama_load_ms": round(figures["cold_ms"] - figures["llama_load_ms"], 2),
        "cold_minus_llama_ready_ms": round(figures["cold_ms"] - figures["llama_ready_ms"], 2),
        "swap_ms": _ms(statistics.median(swap)),
        "swap_unload_ms": _ms(statistics.median(e["duration_s"] for e in logged if e["event"] == "model unloaded")),
        "swap_load_ms": _ms(statistics.median(e["duration_s"] for e in logged if e["event"] == "model loaded")),
        "samples_ms": {figure: [_ms(value) for value in values] for figure, values in samples.items()}})
    return figures


def swap_round(url, key, events, seconds) -> dict:
    """Two clients, one per model, each sending its requests back to back for seconds: requests served and failed
    per client, the swaps (unloads in /metrics) and the median swap time (an unload and the load after it)."""
    counter = Client(url, key)
    unloads_before, logged_before = counter.unloads_total(), len(events.read())
    clients = {name: {"model": name, "ok": 0, "failed": 0, "latencies": [], "failures": []} for name in NAMES}
    stop_at = time.monotonic() + seconds

    def send(name):
        client, tally = Client(url, key), clients[name]
        while time.monotonic() < stop_at:
            took, failure = client.chat(name)
            tally["latencies"].append(took)
            tally["failed" if failure else "ok"] += 1
            if failure:
                tally["failures"].append(failure)

    threads = [threading.Thread(target=send, args=(name,), name=f"bench-client-{name}") for name in NAMES]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    swaps = round(counter.unloads_total() - unloads_before)
    logged = events.wait(logged_before + 2 * swaps, timeout=10)[logged_before:]
    swap_times = [unload["duration_s"] + load["duration_s"] for unload, load in zip(logged, logged[1:])
                  if unload["event"] == "model unloaded" and load["event"] == "model loaded"]
    failures = [failure for tally in clients.values() for failure in tally.pop("failures")]
    for tally in clients.values():
        latencies = tally.pop("latencies")
        tally["p50_ms"] = _ms(statistics.median(latencies)) if latencies else None
    return {"seconds": round(elapsed, 1), "clients": list(clients.values()), "swaps": swaps,
            "swap_median_ms": _ms(statistics.median(swap_times)) if swap_times else None,
            "failed": len(failures), "failures": failures[:SHOWN_FAILURES]}


def models_rounds(key, quick=False) -> dict:
    """Both rounds, on one gateway, with llama.cpp also started directly for the cold round's comparison."""
    runs, seconds = (3, 3) if quick else (10, 60)
    directory = tempfile.mkdtemp(prefix="bench-models-")
    paths = {name: write_demo_model(os.path.join(directory, f"{name}.gguf"), seed=seed)
             for seed, name in enumerate(NAMES)}
    env = gateway_env(paths, key, free_port())
    # Built as the gateway builds its own: the same llama.cpp flags.
    supervisor = supervisor_for(ModelSpec(NAMES[0], source=paths[NAMES[0]]), load_settings({**os.environ, **env}),
                                alias=NAMES[0])
    log_path = os.path.join(directory, "gateway.log")
    events = ModelEvents(log_path)
    with open(log_path, "w") as log, serving(env, log) as url:
        cold = cold_round(Client(url, key), events, supervisor, runs)
        swapping = swap_round(url, key, events, seconds)
    return {"cold_request": cold, "swap_under_load": swapping}


def verdicts(figures) -> dict:
    """The rounds' goals: the gateway's share of a cold request, and no failed request while swapping."""
    cold, swapping = figures["cold_request"], figures["swap_under_load"]
    return {"cold_added_ms": {"value": cold["added_ms"], "goal": COLD_GOAL_MS, "met": cold["added_ms"] <= COLD_GOAL_MS},
            "swap_failed_requests": {"value": swapping["failed"], "goal": 0, "met": swapping["failed"] == 0}}


def report_lines(figures) -> list:
    """The rounds' tables, in bin/bench's Markdown."""
    cold, swapping = figures["cold_request"], figures["swap_under_load"]
    lines = [f"| models on demand: two demo models, MODELS_MAX_LOADED=1, medians of {cold['runs']} | ms |",
             "|---|---|",
             "| llama.cpp started directly by its supervisor (start(): spawn to /health 200) "
             f"| {cold['llama_load_ms']} |",
             f"| the same, /health polled every 5 ms instead of the supervisor's schedule | {cold['llama_ready_ms']} |",
             f"| a fresh llama.cpp's first answer, direct | {cold['llama_first_answer_ms']} |",
             f"| cold request through the gateway, nothing else loaded | {cold['cold_ms']} |",
             f"| its own load, as the gateway timed it (start()) | {cold['own_load_ms']} |",
             f"| added: cold request minus its own load (median per request) | {cold['added_ms']} |",
             f"| cold request minus the direct start() median | {cold['cold_minus_llama_load_ms']} |",
             f"| cold request minus the 5 ms-polled ready median | {cold['cold_minus_llama_ready_ms']} |",
             f"| warm request through the gateway | {cold['warm_ms']} |",
             f"| swap request (the other model unloaded first) | {cold['swap_ms']} |",
             f"| its unload, its load (gateway log) | {cold['swap_unload_ms']}, {cold['swap_load_ms']} |",
             "", f"| swap under load: 2 clients, one per model, back to back, {swapping['seconds']} s "
             "| requests served | failed | p50 latency (ms) |", "|---|---|---|---|"]
    for number, client in enumerate(swapping["clients"], start=1):
        lines.append(f"| client {number} (model {client['model']}) | {client['ok']} | {client['failed']} "
                     f"| {client['p50_ms']} |")
    lines += ["", f"Swaps: {swapping['swaps']} (gateway_model_unloads_total); median swap (unload + load): "
              f"{swapping['swap_median_ms']} ms; failed requests: {swapping['failed']}."]
    lines += [f"- failed: {failure}" for failure in swapping["failures"]]
    return lines


def _ms(seconds) -> float:
    return round(seconds * 1000, 2)
