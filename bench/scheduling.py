"""bin/bench's scheduling rounds (issue 13), on real llama.cpp, straight and through the gateway in one run:

- noisy neighbour: llama.cpp with 2 slots on the demo model; client A sends 10 long generations at once, client B
  one a moment later. B's latency and A's total time (A's first send to its last answer), straight to llama.cpp
  and through gateways (bin/serve) with SCHEDULER=fair and, for reference, fifo. B's yardstick: one slot's turn
  (one of two generations run at once) plus B's own answer alone on an idle llama.cpp;
- multi-turn over 2 replicas of a model whose prompt processing costs what it costs on a real one: concurrent
  conversations, each with its own long system prompt, each turn adding the previous answer and a new question,
  streamed through the gateway with cache-aware placement and with least-busy placement only (the gateway has no
  setting for that: it is served in-process with its routes' affinity tables removed). Time to first token, and
  the prompt tokens llama.cpp computed afresh (prompt_tokens - cached_tokens).
"""
import json
import os
import random
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from functools import partial

import requests

from bench.models import serving
from service import create_app
from service.llama.supervisor import LlamaSupervisor, free_port, start_all
from service.models.demo_model import write_demo_model
from service.wsgi_server import make_server, stop_server

# Two clients, so that the fair scheduler has someone to be fair to.
API_KEYS = "ka:team_a,kb:team_b"
A, B = {"Authorization": "Bearer ka"}, {"Authorization": "Bearer kb"}
BURST = 10  # A's requests, sent at once
B_DELAY_S = 0.3  # B sends this long after A, with 1,200-token answers (scaled with the answer's length)
FULL_TOKENS = 1200
# Pass marks from the scheduling issue.
GOALS = {"noisy_neighbour_b_ratio": 1.5, "noisy_neighbour_b_speedup": 3.0, "noisy_neighbour_a_total_ratio": 1.05,
         "multi_turn_ttft_speedup": 2.0}
# A generated model on which a 2,700-token prompt takes about 420 ms cold and 30 ms cached with one thread (a real
# model's ratio: 607 ms against 43 ms for 9,000 tokens): prompt processing dominates, as on a CPU.
MULTI_TURN_MODEL = {"embedding_size": 128, "layers": 4, "feed_forward_size": 512}
# The system prompts' words: the demo tokenizer makes about one token of each character.
WORDS = ("river mountain library quiet lantern copper harbour seven orchard signal winter paper ledger "
         "falcon meadow engine cobalt garden thunder velvet anchor").split()


def generation(tokens) -> dict:
    """A completion that only max_tokens ends."""
    return {"prompt": "Once upon a time", "max_tokens": tokens, "ignore_eos": True, "temperature": 0}


def timed_post(url, headers, body, at=None) -> tuple:
    """POST body to url's /v1/completions at monotonic time at (now if None); (sent, answered) monotonic times."""
    if at is not None:
        time.sleep(max(0.0, at - time.monotonic()))
    sent = time.monotonic()
    response = requests.post(url + "/v1/completions", json=body, headers=headers, timeout=300)
    if response.status_code != 200:
        raise RuntimeError(f"scheduling round: {response.status_code} {response.text[:200]}")
    return sent, time.monotonic()


def concurrently(calls) -> list:
    """Run each call (no arguments) in its own thread, all at once; their results in order (raise the first
    error)."""
    results, errors = [None] * len(calls), []

    def run(index, call):
        try:
            results[index] = call()
        except Exception as error:  # noqa: BLE001 - raised again below, in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=item, name="bench-client") for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def burst(url, tokens, delay) -> dict:
    """A's BURST generations at once, B's one delay seconds later: B's latency, A's total time (first send to
    last answer), the time until every answer (A's and B's) was in, and how many of A's were answered before B."""
    body, start = generation(tokens), time.monotonic() + 0.05  # a moment for every thread to be ready
    calls = [partial(timed_post, url, A, body, start) for _ in range(BURST)]
    times = concurrently(calls + [partial(timed_post, url, B, body, start + delay)])
    (b_sent, b_done), a = times[-1], times[:-1]
    first, a_done = min(sent for sent, _ in a), max(done for _, done in a)
    return {"b_s": b_done - b_sent, "a_total_s": a_done - first, "all_done_s": max(a_done, b_done) - first,
            "a_before_b": sum(done < b_done for _, done in a)}


def yardstick(url, tokens) -> dict:
    """B's answer alone on an idle llama.cpp, and one slot's turn: the time each of two generations sent at once
    takes (their mean)."""
    body = generation(tokens)
    sent, done = timed_post(url, B, body)
    pair = concurrently([partial(timed_post, url, A, body) for _ in range(2)])
    return {"alone_s": done - sent, "slot_turn_s": statistics.mean(done - sent for sent, done in pair)}


def gateway(env, log):
    """bin/serve with env on a free port, its output in log, until the block ends; yields its URL."""
    return serving({**env, "API_PORT": str(free_port())}, log)


def noisy_neighbour_round(quick=False) -> dict:
    """The burst straight to llama.cpp and through fair and fifo gateways, repetitions interleaved (so that drift
    hits all alike), and the yardstick straight to llama.cpp; medians, in seconds."""
    tokens, runs = (400, 1) if quick else (FULL_TOKENS, 5)
    delay = B_DELAY_S * tokens / FULL_TOKENS
    directory = tempfile.mkdtemp(prefix="bench-scheduling-")
    llama = LlamaSupervisor(write_demo_model(os.path.join(directory, "demo.gguf")), ctx=4096, parallel=2,
                            threads=1, embeddings=False, startup_timeout=60).start()
    env = {"LLAMA_SERVER_URL": llama.url, "OPENAI_API_KEYS": API_KEYS, "LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}
    try:
        with open(os.path.join(directory, "gateways.log"), "w") as log, \
                gateway({**env, "SCHEDULER": "fair"}, log) as fair, gateway({**env, "SCHEDULER": "fifo"}, log) as fifo:
            targets = {"direct": llama.url, "fair": fair, "fifo": fifo}
            for url in targets.values():
                timed_post(url, A, generation(4))  # first connections, the gateway's first request: not measured
            samples = {name: [] for name in (*targets, "yardstick")}
            for _ in range(runs):
                samples["yardstick"].append(yardstick(llama.url, tokens))
                for name, url in targets.items():
                    samples[name].append(burst(url, tokens, delay))
    finally:
        llama.stop()
    figures = {name: {figure: round(statistics.median(run[figure] for run in taken), 3) for figure in taken[0]}
               for name, taken in samples.items()}
    return {**figures, "tokens": tokens, "b_delay_s": round(delay, 3), "runs": runs, "burst": BURST,
            "samples": {name: [{figure: round(value, 3) for figure, value in run.items()} for run in taken]
                        for name, taken in samples.items()}}


def system_prompt(number, words) -> str:
    """Conversation number's own system prompt, of words words (about seven tokens each)."""
    rng = random.Random(number)
    return f"You are assistant number {number}. " + " ".join(rng.choice(WORDS) for _ in range(words))


def stream_turn(url, messages, max_tokens) -> dict:
    """One streamed chat turn: time to its first event, its answer, its usage and llama.cpp's prompt time."""
    body = {"model": "chat", "messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    started, ttft, parts, usage, timings = time.monotonic(), None, [], None, {}
    with requests.post(url + "/v1/chat/completions", json=body, headers=A, stream=True, timeout=300) as response:
        if response.status_code != 200:
            raise RuntimeError(f"multi-turn round: {response.status_code} {response.text[:200]}")
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue  # blank lines, the gateway's waiting comments, [DONE]
            if ttft is None:
                ttft = time.monotonic() - started
            event = json.loads(line[6:])
            parts += [choice["delta"].get("content") or "" for choice in event.get("choices", [])]
            usage, timings = event.get("usage") or usage, event.get("timings") or timings
    if usage is None:
        raise RuntimeError("multi-turn round: a stream without usage")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"ttft_s": ttft, "answer": "".join(parts), "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": cached, "prompt_ms": timings.get("prompt_ms")}


def converse(url, number, turns, words, max_tokens, think_s) -> list:
    """Conversation number, turns turns, each after a think time (seeded, up to think_s): each turn's figures."""
    messages, figures = [{"role": "system", "content": system_prompt(number, words)}], []
    rng = random.Random(1000 + number)
    for turn in range(turns):
        time.sleep(rng.uniform(think_s / 5, think_s))  # the user reading and typing (the first: arriving)
        messages.append({"role": "user", "content": f"Question {turn + 1} of conversation {number}: and then?"})
        result = stream_turn(url, messages, max_tokens)
        messages.append({"role": "assistant", "content": result.pop("answer")})
        figures.append({**result, "turn": turn})
    return figures


@contextmanager
def in_process_gateway(settings, cache_aware):
    """The gateway served by waitress in this process (as bin/serve serves it); without cache_aware, its routes
    keep no affinity table, so that every request goes to the least busy replica. Yields its URL."""
    app = create_app(settings)
    if not cache_aware:
        for route in app.extensions["router"].all_routes:
            route.affinity = None  # the relay then computes no prefix keys: least busy, ties in turn
    server = make_server(app, host="127.0.0.1", port=0, threads=app.config["WAITRESS_THREADS"],
                         max_body_bytes=app.config["MAX_BODY_BYTES"])
    thread = threading.Thread(target=server.run, name="bench-gateway", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        stop_server(server)
        thread.join(10)
        app.extensions["upstream"].close()


def multi_turn_run(path, cache_aware, conversations, turns, words, max_tokens, think_s) -> list:
    """The conversations at once through a gateway in front of 2 fresh llama.cpp replicas: every turn's figures."""
    replicas = [LlamaSupervisor(path, ctx=8192, parallel=2, threads=1, embeddings=False, startup_timeout=60)
                for _ in range(2)]
    start_all(replicas)
    try:
        for replica in replicas:  # each llama.cpp's first-request costs are not the placement's
            timed_post(replica.url, A, generation(4))
        settings = {"MODEL_UPSTREAMS": "chat=" + "|".join(replica.url for replica in replicas),
                    "OPENAI_API_KEYS": API_KEYS}
        with in_process_gateway(settings, cache_aware) as url:
            results = concurrently([partial(converse, url, number, turns, words, max_tokens, think_s)
                                    for number in range(conversations)])
    finally:
        for replica in replicas:
            replica.stop()
    return [turn for conversation in results for turn in conversation]


def multi_turn_round(quick=False) -> dict:
    """Least-busy against cache-aware placement, runs interleaved; TTFT p50 over every turn of every run, and
    the medians over runs of the prompt tokens and turns computed afresh."""
    quick_sizes, full_sizes = (2, 2, 120, 8, 0.2, 1), (4, 4, 380, 32, 1.0, 3)
    conversations, turns, words, max_tokens, think_s, runs = quick_sizes if quick else full_sizes
    path = write_demo_model(os.path.join(tempfile.mkdtemp(prefix="bench-multi-turn-"), "model.gguf"),
                            **MULTI_TURN_MODEL)
    samples = {"least_busy": [], "cache_aware": []}
    for _ in range(runs):
        for mode in samples:
            samples[mode].append(multi_turn_run(path, mode == "cache_aware", conversations, turns, words, max_tokens,
                                                think_s))
    figures = {mode: _placement_figures(mode_runs) for mode, mode_runs in samples.items()}
    every = [turn for mode_runs in samples.values() for run in mode_runs for turn in run]
    cold = [turn for turn in every if turn["cached_tokens"] == 0 and turn["prompt_ms"] is not None]
    warm = [turn for turn in every if turn["cached_tokens"] > turn["prompt_tokens"] / 2 and turn["prompt_ms"]]
    return {**figures, "conversations": conversations, "turns": turns, "runs": runs, "answer_tokens": max_tokens,
            "think_s": think_s, "model": MULTI_TURN_MODEL, "system_prompts": "one of its own per conversation",
            "first_prompt_tokens": statistics.median(run[0]["prompt_tokens"] for run in samples["cache_aware"]),
            # llama.cpp's own prompt processing time (its timings), cold and with most of the prompt cached.
            "cold_prompt_ms": _median(turn["prompt_ms"] for turn in cold),
            "warm_prompt_ms": _median(turn["prompt_ms"] for turn in warm)}


def _placement_figures(runs) -> dict:
    """One placement's figures from its runs' turns."""
    turns = [turn for run in runs for turn in run]
    fresh = [sum(turn["prompt_tokens"] - turn["cached_tokens"] for turn in run) for run in runs]
    # A turn counts as computed afresh when llama.cpp had less than half of its prompt cached.
    afresh = [sum(turn["cached_tokens"] < turn["prompt_tokens"] / 2 for turn in run) for run in runs]
    later = [turn["ttft_s"] for turn in turns if turn["turn"] > 0]
    return {"ttft_p50_ms": _median(turn["ttft_s"] * 1000 for turn in turns),
            "ttft_mean_ms": round(statistics.mean(turn["ttft_s"] * 1000 for turn in turns), 2),
            "ttft_p50_later_turns_ms": _median(ttft * 1000 for ttft in later),
            "fresh_prompt_tokens": statistics.median(fresh), "prompt_tokens": statistics.median(
                sum(turn["prompt_tokens"] for turn in run) for run in runs),
            "turns_afresh": statistics.median(afresh), "turns_per_run": len(runs[0]),
            "ttft_ms_per_run": [_median(turn["ttft_s"] * 1000 for turn in run) for run in runs]}


def _median(values):
    values = list(values)
    return round(statistics.median(values), 2) if values else None


def scheduling_rounds(quick=False) -> dict:
    """Both rounds, one after the other (each starts its own llama.cpp)."""
    return {"noisy_neighbour": noisy_neighbour_round(quick), "multi_turn": multi_turn_round(quick)}


def verdicts(figures) -> dict:
    """The rounds' goals: B's latency against its yardstick and against straight, A's total against straight,
    and TTFT p50 least-busy against cache-aware."""
    noisy, multi = figures["noisy_neighbour"], figures["multi_turn"]
    yard = noisy["yardstick"]
    measured = {
        "noisy_neighbour_b_ratio": noisy["fair"]["b_s"] / (yard["slot_turn_s"] + yard["alone_s"]),
        "noisy_neighbour_b_speedup": noisy["direct"]["b_s"] / noisy["fair"]["b_s"],
        "noisy_neighbour_a_total_ratio": noisy["fair"]["a_total_s"] / noisy["direct"]["a_total_s"],
        "multi_turn_ttft_speedup": multi["least_busy"]["ttft_p50_ms"] / multi["cache_aware"]["ttft_p50_ms"],
    }
    result = {goal: {"value": round(value, 3), "goal": GOALS[goal],
                     "met": value >= GOALS[goal] if goal.endswith("speedup") else value <= GOALS[goal]}
              for goal, value in measured.items()}
    # For reading the A-total goal: B's answer, served before A's last, takes one of A's turns; whether the gateway
    # itself cost any time shows in when the last of all 11 answers came.
    all_done = noisy["fair"]["all_done_s"] / noisy["direct"]["all_done_s"]
    result["noisy_neighbour_all_done_ratio"] = {
        "value": round(all_done, 3), "met": all_done <= GOALS["noisy_neighbour_a_total_ratio"],
        "goal": f"(for reading noisy_neighbour_a_total_ratio) <= {GOALS['noisy_neighbour_a_total_ratio']}: every "
                "answer, A's and B's, in as soon as straight"}
    return result


def report_lines(figures) -> list:
    """The rounds' tables, in bin/bench's Markdown."""
    noisy, multi = figures["noisy_neighbour"], figures["multi_turn"]
    yard = noisy["yardstick"]
    lines = [f"| noisy neighbour: 2 slots, demo model, {noisy['tokens']}-token answers; A sends {noisy['burst']} at "
             f"once, B one {noisy['b_delay_s']} s later (medians of {noisy['runs']}) | B's latency (s) "
             "| A's total (s) | every answer in (s) | A's answered before B |", "|---|---|---|---|---|"]
    for name, what in (("direct", "straight to llama.cpp"), ("fair", "gateway, SCHEDULER=fair"),
                       ("fifo", "gateway, SCHEDULER=fifo")):
        n = noisy[name]
        lines.append(f"| {what} | {n['b_s']} | {n['a_total_s']} | {n['all_done_s']} | {n['a_before_b']} |")
    lines += ["", f"B's answer alone on an idle llama.cpp: {yard['alone_s']} s; one slot's turn (two at once): "
              f"{yard['slot_turn_s']} s; B's goal: at most {GOALS['noisy_neighbour_b_ratio']} x their sum = "
              f"{round(GOALS['noisy_neighbour_b_ratio'] * (yard['alone_s'] + yard['slot_turn_s']), 3)} s.", "",
              f"| multi-turn: {multi['conversations']} conversations at once x {multi['turns']} turns over 2 "
              f"replicas, a system prompt of its own each (first prompt {multi['first_prompt_tokens']} tokens), "
              f"think times up to {multi['think_s']} s, {multi['runs']} runs | TTFT p50 (ms) "
              "| TTFT p50, later turns (ms) "
              "| TTFT mean (ms) | prompt tokens computed afresh, of all | turns computed afresh |",
              "|---|---|---|---|---|---|"]
    for name, what in (("least_busy", "least busy"), ("cache_aware", "cache-aware")):
        m = multi[name]
        lines.append(f"| {what} | {m['ttft_p50_ms']} | {m['ttft_p50_later_turns_ms']} | {m['ttft_mean_ms']} "
                     f"| {m['fresh_prompt_tokens']} of {m['prompt_tokens']} | {m['turns_afresh']} of "
                     f"{m['turns_per_run']} |")
    lines += ["", f"llama.cpp's prompt processing (its timings), median: {multi['cold_prompt_ms']} ms with nothing "
              f"cached, {multi['warm_prompt_ms']} ms with most of the prompt cached."]
    return lines
