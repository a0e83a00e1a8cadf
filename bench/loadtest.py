"""bin/loadtest: drive any OpenAI-compatible server with chat requests and report throughput and latency.
By default it drives the gateway bin/serve starts: API_HOST and API_PORT from the environment, else .env.

    python bin/loadtest --requests 40 --concurrency 8 --model llama --api-key local
    python bin/loadtest --url http://127.0.0.1:8080 --stream --duration 30 --json result.json
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit


ENV_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".env")
# A connection that can never succeed: a run would fire thousands of them a second and call it a rate.
UNREACHABLE = (ConnectionRefusedError, socket.gaierror)


class Unreachable(Exception):
    """Nothing answers at the target (a refused connection, or a host that does not resolve): the run stopped at
    the first."""


def gateway_url(environ=None, env_file=ENV_FILE) -> str:
    """The base URL of the gateway bin/serve would start: API_HOST and API_PORT as bin/serve reads them (the
    environment, else .env); raise ConfigError on a bad one."""
    from dotenv import dotenv_values

    from service.config import local_base_url

    file = dotenv_values(env_file) if os.path.isfile(env_file) else {}
    return local_base_url({**file, **(os.environ if environ is None else environ)})


def percentile(values, fraction):
    """The fraction-th percentile of values (nearest rank), or None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


class Target:
    """Where requests go: a base URL (with or without /v1), a key, and the chat body to send."""

    def __init__(self, url, api_key=None, model="llama", prompt="Write one sentence about llamas.",
                 max_tokens=32, stream=False):
        self.url = url
        parts = urlsplit(url.rstrip("/"))
        self.host, self.port = parts.hostname, parts.port or 80
        base = parts.path if parts.path.endswith("/v1") else parts.path + "/v1"
        self.path = base + "/chat/completions"
        self.stream = stream
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                                "max_tokens": max_tokens, "stream": stream}).encode()


class Result:
    """One request's outcome."""

    __slots__ = ("status", "latency", "ttft", "tokens", "chunk_times")

    def __init__(self, status, latency, ttft=None, tokens=0, chunk_times=None):
        self.status, self.latency, self.ttft, self.tokens, self.chunk_times = status, latency, ttft, tokens, chunk_times


def send(conn, target: Target, keep_chunk_times=False) -> Result:
    """Send one request on conn and read the whole answer."""
    started = time.perf_counter()
    conn.request("POST", target.path, body=target.body, headers=target.headers)
    response = conn.getresponse()
    if not target.stream or response.status != 200:
        body = response.read()
        tokens = 0
        if response.status == 200:
            try:
                tokens = json.loads(body).get("usage", {}).get("completion_tokens", 0)
            except ValueError:
                pass
        return Result(response.status, time.perf_counter() - started, tokens=tokens)
    ttft, tokens, chunk_times, pending = None, 0, [] if keep_chunk_times else None, b""
    while True:
        data = response.read1(65536)
        if not data:
            break
        now = time.perf_counter()
        pending += data
        *events, pending = pending.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            if ttft is None:
                ttft = now - started
            if b'"content"' in event:
                tokens += 1
            if chunk_times is not None:
                chunk_times.append(now - started)
    return Result(response.status, time.perf_counter() - started, ttft, tokens, chunk_times)


def run(target: Target, requests=None, duration=None, concurrency=1, progress=None, keep_chunk_times=False):
    """Send requests (a count, or for a duration) from concurrency threads; return (results, seconds). Raise
    Unreachable at the first refused connection."""
    results, lock = [], threading.Lock()
    issued = [0]
    deadline = time.perf_counter() + duration if duration else None
    unreachable = []

    def take() -> bool:
        with lock:
            if unreachable:
                return False
            if requests is not None and issued[0] >= requests:
                return False
            if deadline is not None and time.perf_counter() >= deadline:
                return False
            issued[0] += 1
            return True

    def worker():
        conn = http.client.HTTPConnection(target.host, target.port, timeout=600)
        while take():
            try:
                result = send(conn, target, keep_chunk_times)
            except UNREACHABLE as error:
                unreachable.append(error)
                break
            except (OSError, http.client.HTTPException) as error:
                result = Result(type(error).__name__, 0.0)
                conn.close()
                conn = http.client.HTTPConnection(target.host, target.port, timeout=600)
            with lock:
                results.append(result)
            if progress:
                progress(len(results))
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if unreachable:
        error = unreachable[0]
        raise Unreachable(f"nothing answers at {target.url}: {error.strerror or error}")
    return results, time.perf_counter() - started


def summarize(results, seconds) -> dict:
    """Throughput, latency percentiles, time to first token and tokens/s, errors by status."""
    ok = [r for r in results if r.status == 200]
    latencies = [r.latency * 1000 for r in ok]
    ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
    tokens = sum(r.tokens for r in ok)
    summary = {
        "requests": len(results), "ok": len(ok), "seconds": round(seconds, 3),
        "requests_per_s": round(len(results) / seconds, 1) if seconds else None,
        "latency_ms": {name: _round(percentile(latencies, q)) for name, q in (("p50", .5), ("p90", .9), ("p99", .99))},
        "errors": dict(Counter(str(r.status) for r in results if r.status != 200)),
        "tokens_per_s": round(tokens / seconds, 1) if seconds and tokens else None,
    }
    if ttfts:
        summary["ttft_ms"] = {name: _round(percentile(ttfts, q)) for name, q in (("p50", .5), ("p90", .9),
                                                                                  ("p99", .99))}
    if latencies:
        summary["latency_ms"]["mean"] = _round(statistics.fmean(latencies))
    return summary


def _round(value):
    return None if value is None else round(value, 2)


def table(summary: dict) -> str:
    """The summary as a small text table."""
    rows = [("requests", f"{summary['requests']} ({summary['ok']} ok) in {summary['seconds']} s"),
            ("requests/s", summary["requests_per_s"])]
    for name in ("p50", "p90", "p99"):
        rows.append((f"latency {name} (ms)", summary["latency_ms"][name]))
    if "ttft_ms" in summary:
        for name in ("p50", "p90", "p99"):
            rows.append((f"time to first token {name} (ms)", summary["ttft_ms"][name]))
    rows.append(("tokens/s", summary["tokens_per_s"] or "-"))
    rows.append(("errors", ", ".join(f"{status}: {n}" for status, n in summary["errors"].items()) or "none"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def progress_bar(total=None, duration=None, stream=sys.stderr):
    """A live one-line progress bar on stream."""
    started = time.perf_counter()

    def show(done):
        elapsed = time.perf_counter() - started
        fraction = done / total if total else min(1.0, elapsed / duration) if duration else 0
        bar = "#" * int(fraction * 30)
        stream.write(f"\r[{bar:<30}] {done}{f'/{total}' if total else ''} requests, "
                     f"{done / elapsed if elapsed else 0:.1f} req/s ")
        stream.flush()
    return show


def main(argv=None) -> int:
    """Run a load test from the command line."""
    parser = argparse.ArgumentParser(prog="bin/loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="server base URL (default: the gateway at API_HOST and API_PORT, as bin/serve "
                                      "reads them; http://127.0.0.1:8000 unless they are set)")
    parser.add_argument("--requests", type=int, default=40, help="how many requests (unless --duration)")
    parser.add_argument("--duration", type=float, help="run for this many seconds instead of a count")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--stream", action="store_true", help="stream, and measure time to first token")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="Write one sentence about llamas.")
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON to FILE")
    args = parser.parse_args(argv)
    if not args.url:
        from service.config import ConfigError, exit_on_config_error

        try:
            args.url = gateway_url()
        except ConfigError as error:
            exit_on_config_error(error)
    target = Target(args.url, args.api_key, args.model, args.prompt, args.max_tokens, args.stream)
    count = None if args.duration else args.requests
    show = progress_bar(total=count, duration=args.duration) if sys.stderr.isatty() else None
    try:
        results, seconds = run(target, requests=count, duration=args.duration, concurrency=args.concurrency,
                               progress=show)
    except Unreachable as error:
        print(f"error: {error}; start the gateway (bin/serve), or give --url", file=sys.stderr)
        return 1
    if show:
        sys.stderr.write("\n")
    summary = summarize(results, seconds)
    print(table(summary))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(summary, file, indent=2)
    return 0 if summary["ok"] else 1
