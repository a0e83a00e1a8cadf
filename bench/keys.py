"""bin/bench's stored-keys round (issue 23): what 10,000 keys in the database add to a request at c=1.

Four gateways (bin/serve) in front of the canned upstream, their requests interleaved block by block (the order
turned each round) so that drift hits all alike:
  env          OPENAI_API_KEY, an empty database: today's path (bin/serve always opens one, gateway.db by default)
  env_again    the same on a second gateway: how far two runs of one path fall apart (the noise, for reading)
  stored       a stored key, with 10,000 keys in the database (each with an rpm, a tpm and a monthly budget)
  env_10k      OPENAI_API_KEY on the same 10,000-key database
Each gateway's CPU per request is read from /proc (Linux) too: on a busy machine it moves far less than latency.
Then every gateway sits idle, and the CPU each spends meanwhile is read: the store's thread reads the keys
changed and the budgets' totals every second.
"""
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import requests
from sqlalchemy import insert, update

from bench.loadtest import Target, percentile, run
from service.llama.supervisor import free_port
from service.paths import PROJECT_ROOT

KEYS = 10_000
LOOKUPS = 10_000
CREATED = 100  # made one by one with KeyStore.create (timed); the rest inserted in one statement
KEY_FIELDS = {"rpm": 100_000_000, "tpm": 2_000_000_000, "budget_tokens": 10 ** 12, "budget_per": "month"}
SIZES = {"quick": {"requests": 200, "blocks": 4, "warmup": 20, "idle_s": 3.0},
         "full": {"requests": 2000, "blocks": 10, "warmup": 100, "idle_s": 10.0}}
# name: (what it is, its database, the key its requests carry)
WAYS = {"env": ("OPENAI_API_KEY, empty database (today's path)", "empty", "env"),
        "env_again": ("the same, a second gateway (noise)", "empty_again", "env"),
        "stored": (f"a stored key, {KEYS:,} keys in the database", "keys", "stored"),
        "env_10k": (f"OPENAI_API_KEY, the same {KEYS:,}-key database", "keys", "env")}
# Within noise: the largest of the spread between two runs of the env path (on a busy machine it is wide), 5 % of
# the env path's p50 and 50 us (a quiet machine's one spread can be a lucky few us).
NOISE_SHARE, NOISE_FLOOR_US = 0.05, 50.0


def fill_database(path, count=KEYS) -> tuple:
    """An SQLite database at path with count stored keys; (one key's secret, how long making them took)."""
    from service.store import open_store
    from service.store import schema
    from service.store.key_cache import KeyCache, digest_of
    from service.store.keys import new_secret

    store = open_store("sqlite:///" + path)
    try:
        started = time.perf_counter()
        made = [store.keys.create(f"bench-{i}", **KEY_FIELDS) for i in range(CREATED)]
        create_s = time.perf_counter() - started
        started, now = time.perf_counter(), time.time()
        rows = [{"id": "key_" + secrets.token_hex(6), "name": f"bench-{i}", "digest": digest_of(new_secret()),
                 "prefix": "sk-gw-xx", "created_at": now, "updated_at": now, **KEY_FIELDS}
                for i in range(CREATED, count)]
        with store.engine.begin() as connection:
            connection.execute(insert(schema.keys), rows)
            # Made an hour ago, as keys in use are: else each gateway's refresh reads them all again for the
            # first OVERLAP_S (10 s) of their life, and the latencies with them.
            connection.execute(update(schema.keys).values(created_at=now - 3600, updated_at=now - 3600))
        bulk_s = time.perf_counter() - started
        started = time.perf_counter()  # what a gateway's start and each full reload (every 5 min) read
        with store.engine.connect() as connection:
            KeyCache(store.engine, store.health, "open", time.time).refresh(connection)
        full_read_s = time.perf_counter() - started
        secret = made[CREATED // 2][1]
        started = time.perf_counter()  # the store's share of a request, free of the HTTP round trip's noise
        for _ in range(LOOKUPS):
            store.keys.lookup(secret)
        lookup_s = (time.perf_counter() - started) / LOOKUPS
    finally:
        store.close()
    return secret, {"create_ms_per_key": round(create_s / CREATED * 1000, 3), "bulk_insert_s": round(bulk_s, 3),
                    "full_read_ms": round(full_read_s * 1000, 1), "lookup_us": round(lookup_s * 1e6, 2)}


@contextmanager
def gateways(envs, log):
    """bin/serve once per environment (started together), output into the open file log, until the block ends;
    yields {name: (its URL, its pid)} once every one answers /health."""
    processes = {name: subprocess.Popen([sys.executable, "bin/serve"], env={**os.environ, **env}, cwd=PROJECT_ROOT,
                                        stdout=log, stderr=log) for name, env in envs.items()}
    try:
        deadline = time.monotonic() + 60
        for name, process in processes.items():
            while not _answers(f"http://127.0.0.1:{envs[name]['API_PORT']}/health"):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway did not start; see {log.name}")
                time.sleep(0.02)
        yield {name: (f"http://127.0.0.1:{envs[name]['API_PORT']}", process.pid)
               for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait(30)


def _answers(url) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def cpu_seconds(pid):
    """(the process's CPU seconds, {thread id: CPU seconds}) from /proc, or None where there is no /proc."""
    if not os.path.exists(f"/proc/{pid}/stat"):
        return None
    tick = os.sysconf("SC_CLK_TCK")

    def used(stat_path):
        with open(stat_path) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            threads[tid] = used(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            pass  # a thread that ended meanwhile
    return used(f"/proc/{pid}/stat"), threads


def idle_cpu(pids, seconds) -> dict:
    """Per gateway: CPU ms per second of idle, the whole process and its busiest thread (None without /proc)."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    result = {}
    for name, pid in pids.items():
        after = cpu_seconds(pid)
        if before[name] is None or after is None:
            result[name] = None
            continue
        busiest = max((after[1][tid] - before[name][1].get(tid, 0.0) for tid in after[1]), default=0.0)
        result[name] = {"process_ms_per_s": round((after[0] - before[name][0]) * 1000 / seconds, 2),
                        "busiest_thread_ms_per_s": round(busiest * 1000 / seconds, 2)}
    return result


def keys_round(upstream, env_key, gateway_env, log, quick=False) -> dict:
    """The round; gateway_env(upstream, port) is the environment of bin/bench's other overhead gateways."""
    size = SIZES["quick" if quick else "full"]
    directory = tempfile.mkdtemp(prefix="bench-keys-")
    try:
        secret, making = fill_database(os.path.join(directory, "keys.db"))
        carried = {"env": env_key, "stored": secret}
        envs = {name: {**gateway_env(upstream, free_port()), "MODELS_DIR": directory,
                       "KV_CACHE_DIR": os.path.join(directory, f"kv-{name}"),
                       "DATABASE_URL": "sqlite:///" + os.path.join(directory, database + ".db")}
                for name, (_, database, _) in WAYS.items()}
        with gateways(envs, log) as started:
            targets = {name: Target(started[name][0], carried[key], max_tokens=16)
                       for name, (_, _, key) in WAYS.items()}
            ways = _measure(targets, {name: pid for name, (_, pid) in started.items()}, size, log)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"keys": {"ways": ways, "requests": size["requests"], "blocks": size["blocks"], "keys": KEYS,
                     "making": making, "idle_s": size["idle_s"]}}


def _measure(targets, pids, size, log) -> dict:
    for target in targets.values():
        run(target, requests=size["warmup"])
    names, block = list(WAYS), size["requests"] // size["blocks"]
    latencies = {name: [] for name in WAYS}
    # CPU per request: far less disturbed than latency by whatever else the machine runs meanwhile.
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    for turn in range(size["blocks"]):
        for name in names[turn % len(names):] + names[:turn % len(names)]:  # each turn starts with the next one
            results, _ = run(targets[name], requests=block)
            failed = [r.status for r in results if r.status != 200]
            if failed:
                raise RuntimeError(f"keys round: {name} answered {failed[0]}; see {log.name}")
            latencies[name] += [r.latency * 1e6 for r in results]
    cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(2.0)  # the last usage written: what follows is idle
    idle = idle_cpu(pids, size["idle_s"])
    return {name: _way(values, cpu_before[name], cpu_after[name], idle[name]) for name, values in latencies.items()}


def _way(latencies, cpu_before, cpu_after, idle) -> dict:
    cpu = (cpu_after[0] - cpu_before[0]) * 1e6 / len(latencies) if cpu_before and cpu_after else None
    return {"p50_us": round(percentile(latencies, 0.5), 1), "p90_us": round(percentile(latencies, 0.9), 1),
            "cpu_us_per_request": None if cpu is None else round(cpu, 1), "idle_cpu": idle}


def verdicts(figures) -> dict:
    """The round's goal: the stored key's p50 within noise of today's path."""
    ways = figures["keys"]["ways"]
    today = ways["env"]["p50_us"]
    spread = abs(ways["env_again"]["p50_us"] - today)
    noise = max(spread, NOISE_SHARE * today, NOISE_FLOOR_US)
    added = ways["stored"]["p50_us"] - today
    result = {"stored_key_added_p50_us": {
        "value": round(added, 1), "met": added <= noise,
        "goal": f"<= noise = max(two runs of today's path apart: {spread:.0f} us, 5 % of its p50, 50 us) "
                f"= {noise:.0f} us"}}
    cpu = {name: way["cpu_us_per_request"] for name, way in ways.items()}
    if cpu["env"] is not None:
        result["stored_key_added_cpu_us"] = {
            "value": round(cpu["stored"] - cpu["env"], 1), "met": True,
            "goal": "(for reading the p50: the gateway's CPU per request, stored key minus env key; two runs of the "
                    f"env path: {abs(cpu['env_again'] - cpu['env']):.0f} us apart)"}
    return result


def report_lines(figures) -> list:
    """The round's table, in bin/bench's Markdown."""
    keys = figures["keys"]
    ways, making = keys["ways"], keys["making"]
    lines = [f"| stored keys: c=1, {keys['requests']} requests each in {keys['blocks']} interleaved blocks | "
             f"p50 (us) | p90 (us) | p50 added over today's (us) | gateway CPU per request (us) "
             "| CPU idle, process / busiest thread (ms/s) |", "|---|---|---|---|---|---|"]
    for name, (what, _, _) in WAYS.items():
        way, idle = ways[name], ways[name]["idle_cpu"]
        cpu = f"{idle['process_ms_per_s']} / {idle['busiest_thread_ms_per_s']}" if idle else "not measured"
        lines.append(f"| {name} ({what}) | {way['p50_us']} | {way['p90_us']} | "
                     f"{way['p50_us'] - ways['env']['p50_us']:.1f} | {way['cpu_us_per_request']} | {cpu} |")
    lines.append(f"\n{keys['keys']:,} keys: {CREATED} by KeyStore.create at {making['create_ms_per_key']} ms each, "
                 f"the rest by one INSERT in {making['bulk_insert_s']} s; reading all of them into a fresh cache "
                 f"(a gateway's start, and every full reload, 5 min apart) took {making['full_read_ms']} ms; one "
                 f"lookup of a stored key in the cache, in process: {making['lookup_us']} us. "
                 f"Idle CPU over {keys['idle_s']} s after the load.")
    return lines
