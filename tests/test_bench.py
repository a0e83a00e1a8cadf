"""bin/loadtest and bin/bench keep working: they run and report (no speed is asserted here; bin/bench does that)."""
import json
import os
import signal
import subprocess
import sys

import pytest

from bench.loadtest import main as loadtest_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.llama
@pytest.mark.parametrize("stream", [False, True])
def test_loadtest_reports_on_the_gateway(llama_app, live_gateway, tmp_path, capsys, stream):
    out = tmp_path / "summary.json"
    args = ["--url", live_gateway(llama_app), "--requests", "6", "--concurrency", "2", "--max-tokens", "4",
            "--api-key", "local", "--json", str(out)] + (["--stream"] if stream else [])
    assert loadtest_main(args) == 0
    summary = json.loads(out.read_text())
    assert summary["requests"] == summary["ok"] == 6 and summary["errors"] == {}
    assert summary["latency_ms"]["p50"] > 0 and summary["requests_per_s"] > 0
    assert ("ttft_ms" in summary) is stream
    printed = capsys.readouterr().out
    assert "requests/s" in printed and "latency p99 (ms)" in printed


def test_loadtest_counts_errors_by_status(make_app, httpserver, live_gateway, tmp_path):
    httpserver.expect_request("/v1/chat/completions").respond_with_json({"error": {"message": "no"}}, status=400)
    out = tmp_path / "summary.json"
    assert loadtest_main(["--url", live_gateway(make_app(httpserver.url_for("").rstrip("/"))), "--requests", "3",
                          "--concurrency", "1", "--json", str(out)]) == 1
    assert json.loads(out.read_text())["errors"] == {"400": 3}


def run_bench(args, timeout) -> subprocess.CompletedProcess:
    """Run bin/bench; if it is cut short (its timeout, or the test's), end it with the helper processes it
    started (an upstream, a passthrough, a gateway), which share its new session, instead of orphaning them."""
    command = [sys.executable, os.path.join(ROOT, "bin", "bench"), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               start_new_session=os.name == "posix")
    try:
        out, err = process.communicate(timeout=timeout)
    except BaseException:
        if os.name == "posix":
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()  # Windows: its helpers are left to end with their pipes
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


# bin/bench --quick took 11 s on an idle 2-core machine and 36 s with both cores busy, before its models-on-demand
# rounds added 10 to 15 s (and its scheduling rounds about 8 s more, its warm-conversations round about 30 s more):
# too close to the suite's 60 s per test (setup.cfg). Its own bound, with the run's timeout inside it.
@pytest.mark.llama
@pytest.mark.timeout(270)
def test_bench_quick_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench(["--quick", "--json", str(out)], timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert set(figures["load"]) == {"direct", "bare", "gateway"}
    assert not any(target["errors"] for target in figures["load"].values())
    assert set(figures["verdicts"]) >= {"overhead_ratio_c1", "throughput_share_c16", "added_ttft_ms",
                                        "added_ms_per_chunk", "rss_mib", "start_s", "no_memory_growth",
                                        "flood_added_p50_ms", "flood_all_held"}
    assert figures["flood"]["held"] == figures["flood"]["connections"] == 300
    assert {name: figures["streaming"][name]["events"] for name in ("direct", "bare", "gateway")} == {
        "direct": 21, "bare": 21, "gateway": 21}
    assert "| goal | measured | target | met |" in result.stdout
    cold, swapping = figures["cold_request"], figures["swap_under_load"]
    assert all(cold[figure] > 0 for figure in ("llama_load_ms", "llama_ready_ms", "llama_first_answer_ms", "cold_ms",
                                               "own_load_ms", "warm_ms", "swap_ms", "swap_load_ms"))
    assert {"added_ms", "cold_minus_llama_load_ms", "cold_minus_llama_ready_ms", "swap_unload_ms"} <= set(cold)
    assert {figure: len(values) for figure, values in cold["samples_ms"].items()} == {
        "llama_load": 3, "llama_ready": 3, "llama_first_answer": 3, "cold": 3, "warm": 3, "own_load": 3}
    assert swapping["failed"] == 0, swapping["failures"]  # not a speed: no request may fail while models swap
    assert [(client["model"], client["ok"] > 0) for client in swapping["clients"]] == [("a", True), ("b", True)]
    # The clients' models took turns: a request waiting for its model is not starved by the other client's.
    assert swapping["swaps"] >= min(client["ok"] for client in swapping["clients"]) > 0
    assert swapping["swap_median_ms"] > 0
    assert {"cold_added_ms", "swap_failed_requests"} <= set(figures["verdicts"])
    assert "| cold request through the gateway, nothing else loaded |" in result.stdout
    assert "| swap under load: 2 clients" in result.stdout and "Swaps: " in result.stdout
    noisy, multi = figures["noisy_neighbour"], figures["multi_turn"]
    assert all(noisy[name][figure] > 0 for name in ("direct", "fair", "fifo")
               for figure in ("b_s", "a_total_s", "all_done_s")), noisy
    assert noisy["yardstick"]["alone_s"] > 0 and noisy["yardstick"]["slot_turn_s"] > 0
    assert {name: len(noisy["samples"][name]) for name in ("direct", "fair", "fifo", "yardstick")} == {
        "direct": 1, "fair": 1, "fifo": 1, "yardstick": 1}
    for placement in ("least_busy", "cache_aware"):
        figures_of = multi[placement]
        assert figures_of["ttft_p50_ms"] > 0 and figures_of["turns_per_run"] == 4  # 2 conversations x 2 turns
        assert 0 < figures_of["fresh_prompt_tokens"] <= figures_of["prompt_tokens"]
    # Not a speed: with cache-aware placement only each conversation's first turn is computed afresh.
    assert multi["cache_aware"]["turns_afresh"] == multi["conversations"] == 2
    assert multi["cold_prompt_ms"] > 0 and multi["warm_prompt_ms"] > 0  # llama.cpp's timings came through
    assert {"noisy_neighbour_b_ratio", "noisy_neighbour_b_speedup", "noisy_neighbour_a_total_ratio",
            "noisy_neighbour_all_done_ratio", "multi_turn_ttft_speedup"} <= set(figures["verdicts"])
    assert "| noisy neighbour: 2 slots" in result.stdout and "| multi-turn: 2 conversations" in result.stdout
    warm = figures["warm"]
    assert warm["model"] == "random" and warm["prompt_tokens"] > 512  # over the quick run's KV_SAVE_MIN_TOKENS
    for side in ("without", "with"):
        assert all(warm[side][figure] > 0 for figure in ("first_ttft_ms", "swap_ttft_ms", "swap_load_ms",
                                                         "kill_ttft_ms", "short_p50_ms")), warm[side]
        run = warm["sides"][side]
        assert len(run["swaps"]) == 1 and len(run["short_ms"]) == 5 and run["kill"]["restart_s"] > 0
    # Not speeds: without warm conversations a returning turn's prompt is computed whole again; with them, after
    # the swap and after the kill -9 (once a save showed), most of it came from a restored state.
    without, with_ = warm["sides"]["without"], warm["sides"]["with"]
    assert without["swaps"][0]["returning"]["cached_tokens"] == without["kill"]["returning"]["cached_tokens"] == 0
    assert with_["kill"]["saved_after_s"] is not None and with_["states_on_disk"] > 0
    for returning in (with_["swaps"][0]["returning"], with_["kill"]["returning"]):
        assert returning["cached_tokens"] > returning["prompt_tokens"] / 2, returning
    assert {"warm_swap_ttft_speedup", "warm_kill_ttft_speedup", "warm_no_restore_cost"} <= set(figures["verdicts"])
    assert "| warm conversations: random" in result.stdout
