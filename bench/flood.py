"""bin/bench's flood round: another client's latency and the gateway's memory with many half-open connections held
open against it by one client (issue 15)."""
import os
import socket
import statistics
import time

from bench.loadtest import Target, run

# What each flood connection sends: a request line and never the rest of its headers (a half-open request).
HALF_OPEN = b"GET / HTTP/1.1\r\n"


def raise_own_open_file_limit(wanted):
    """Raise this process's soft open-file limit to its hard one (the flood's sockets are ours too); return the
    soft limit now in force, or None where the OS has no such limit."""
    if os.name != "posix":
        return None  # Windows: no RLIMIT_NOFILE
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit (macOS) refuses an unlimited soft one: aim at what the round needs, finitely.
    target = max(wanted, 65536) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # refused: the round floods with as many sockets as the limit there is allows
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def held_connections(pid, port) -> int:
    """How many client connections pid holds on its port: its sockets that /proc/net/tcp lists as established
    there (Linux). Counted by socket, not by descriptor count, which other files and pooled upstream connections
    also move."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as entries:
                rows = entries.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 01: established
                inodes.add(fields[9])
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        held += link.startswith("socket:[") and link[8:-1] in inodes
    return held


def p50_ms(url, key, requests) -> float:
    """Median latency (ms) of requests non-streamed chat requests at c=1 (the load rounds' cheap request)."""
    results, _ = run(Target(url, key, max_tokens=16), requests=requests, concurrency=1)
    ok = [r.latency * 1000 for r in results if r.status == 200]
    if len(ok) != len(results):
        raise RuntimeError(f"flood round: {len(results) - len(ok)} of {len(results)} requests failed")
    return statistics.median(ok)


def flood_round(pid, url, key, connections, requests, rss_mib):
    """p50 at c=1 and the gateway's RSS, without and then with connections half-open sockets held open."""
    soft = raise_own_open_file_limit(connections + 256)
    if soft is not None:
        connections = min(connections, soft - 256)  # room for the bench's own files and the latency client
    host, port = url.rsplit("//", 1)[1].split(":")
    p50_without = p50_ms(url, key, requests)
    rss_without = rss_mib(pid)
    flood = []
    try:
        for _ in range(connections):
            sock = socket.create_connection((host, int(port)), timeout=10)
            flood.append(sock)
            sock.sendall(HALF_OPEN)
        # The flood counts once the gateway holds every socket, not merely once the kernel queued them.
        deadline = time.monotonic() + 60
        while held_connections(pid, int(port)) < connections:
            if time.monotonic() > deadline:
                raise RuntimeError(f"flood round: the gateway took {held_connections(pid, int(port))} of "
                                   f"{connections}")
            time.sleep(0.05)
        rss_with = rss_mib(pid)
        p50_with = p50_ms(url, key, requests)
        # Still all held after the latency run: the gateway dropped none of them (limit, timeout) meanwhile.
        held = min(held_connections(pid, int(port)), connections)
    finally:
        for sock in flood:
            sock.close()
    return {"connections": connections, "held": held, "requests": requests,
            "p50_ms": [round(p50_without, 3), round(p50_with, 3)],
            "rss_mib": [round(rss_without, 1), round(rss_with, 1)],
            "kib_per_connection": round((rss_with - rss_without) * 1024 / connections, 2)}
