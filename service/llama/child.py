"""Run llama.cpp's own HTTP server from the xllamacpp package: `python -m service.llama.child --model M ...`.

It takes the same long flags as the llama-server binary, so the supervisor builds one command line for both.
It exits when told to (SIGTERM, Ctrl-C) or, with --exit-with-stdin, when its parent goes away (the stdin pipe
closes), so a killed gateway never leaves it behind, on Windows too.
"""
import argparse
import os
import signal
import sys
import threading
import time

# The line this child prints on stdout once it serves (service/llama/supervisor.py waits for it).
SERVING = "service.llama.child: serving on"


def parse_args(argv):
    """Parse the llama-server flags this child understands."""
    parser = argparse.ArgumentParser(prog="service.llama.child")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ctx-size", type=int, default=4096)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--threads-batch", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--embeddings", action="store_true")
    parser.add_argument("--pooling", choices=["mean", "rank"])
    parser.add_argument("--metrics", action="store_true")
    parser.add_argument("--alias")
    parser.add_argument("--threads-http", type=int)
    parser.add_argument("--cache-ram", type=int)
    parser.add_argument("--exit-with-stdin", action="store_true",
                        help="exit when stdin closes (the supervisor's pipe: its end closes when it dies)")
    return parser.parse_args(argv)


def server_params(args):
    """Translate the flags into xllamacpp's CommonParams."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx_size
    params.n_parallel = args.parallel
    if args.threads:
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
    if args.threads_batch:
        params.cpuparams_batch.n_threads = args.threads_batch
    if args.batch_size:
        params.n_batch = args.batch_size
    if args.embeddings:
        params.embedding = True
        if args.pooling:  # else the model's own pooling, as its GGUF says
            params.pooling_type = getattr(xllamacpp.llama_pooling_type, POOLING[args.pooling])
    if args.alias:
        params.model_alias = {args.alias}
    if args.threads_http:
        params.n_threads_http = args.threads_http
    if args.cache_ram is not None:
        params.cache_ram_mib = args.cache_ram
    params.endpoint_metrics = args.metrics
    return params


# --pooling as llama-server spells it, to xllamacpp's names; rank makes the server a reranker (/v1/rerank).
POOLING = {"mean": "LLAMA_POOLING_TYPE_MEAN", "rank": "LLAMA_POOLING_TYPE_RANK"}


def _leave(*_):
    # No cleanup is owed, and a normal interpreter exit can hang on llama.cpp's non-daemon threads (or on
    # flushing into the pipe of a supervisor that has died). Nothing here takes a lock: a signal handler
    # that did could deadlock with the code it interrupted.
    os._exit(0)


def _leave_when_parent_goes():
    # The supervisor holds the other end of our stdin; EOF means it is gone, however it died.
    try:
        while sys.stdin.buffer.read(1024):
            pass
    except (OSError, ValueError):
        pass
    _leave()


def main(argv=None):
    """Start the server and keep this process alive until told to stop."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import xllamacpp

    signal.signal(signal.SIGTERM, _leave)
    signal.signal(signal.SIGINT, _leave)
    if args.exit_with_stdin:
        threading.Thread(target=_leave_when_parent_goes, daemon=True).start()
    try:
        server = xllamacpp.Server(server_params(args))
    except RuntimeError:
        # The model did not load, or the port was taken; llama.cpp has said why in its log. Not printed here: the
        # supervisor quotes llama.cpp's own error line, the one that says what is wrong.
        os._exit(1)
    # Server() returns once the model is loaded and this process listens on the port: say so, so that the
    # supervisor knows a 200 there is ours and not another program's.
    print(f"{SERVING} {server.listening_address}", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        _leave()


if __name__ == "__main__":
    main()
