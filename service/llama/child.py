"""Run llama.cpp's own HTTP server from the xllamacpp package: `python -m service.llama.child --model M ...`.

It takes llama-server's flags, applied through the one flag table (service/llama/flags.py), so the supervisor
builds one command line for both. It exits when told to (SIGTERM, Ctrl-C) or, with --exit-with-stdin, when its
parent goes away (the stdin pipe closes), so a killed gateway never leaves it behind, on Windows too.
"""
import os
import signal
import sys
import tempfile
import threading
import time

from .flags import FlagError, apply

# What this child says once it serves: into the file READY_FILE names (the supervisor's channel), and on stdout
# for a person who runs it by hand. Not on stdout alone: llama.cpp writes each log line there in several pieces
# from its own thread, so a line of ours can land inside one of its lines.
SERVING = "service.llama.child: serving on"
READY_FILE = "SERVICE_LLAMA_READY_FILE"  # an environment variable: the path of a file the supervisor made
# The line this child prints when it cannot take its flags (before llama.cpp writes anything): the supervisor's
# start error quotes what follows it.
REFUSED = "service.llama.child: error: "
# Flags of this child alone, never llama.cpp's: exit when stdin closes (the supervisor's pipe: its end closes
# when it dies).
EXIT_WITH_STDIN = "--exit-with-stdin"
# How long a child that failed to load waits for llama.cpp's log thread to write out why (its lines come in pieces).
LOG_SETTLE_S = 0.3
# Where llama-server's flags leave something unset, what this child always did: a context of 4096 (xllamacpp's own
# default, 0, would take the model's whole trained context). The argv's own flags come after, so they win.
DEFAULTS = ("--ctx-size", "4096")


def server_params(argv):
    """xllamacpp's CommonParams from llama-server flags; raises FlagError naming the first flag it cannot take."""
    import xllamacpp

    params = apply(xllamacpp.CommonParams(), [*DEFAULTS, *argv])
    if not params.model.path:
        raise FlagError("--model", "--model is required: the GGUF file to serve")
    return params


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


def say_serving(address):
    """Tell the supervisor that this process serves on address (the file READY_FILE names), and whoever reads
    stdout."""
    line = f"{SERVING} {address}\n".encode()
    path = os.environ.get(READY_FILE)
    if path:
        # Opened without creating it: a file the supervisor has already given up on and removed stays gone.
        try:
            ready = os.open(path, os.O_WRONLY)
        except OSError:
            pass
        else:
            try:
                os.write(ready, line)
            finally:
                os.close(ready)
    _say(line.decode())


class ReadyFile:
    """The supervisor's end of the channel: an empty file of its own that the child writes into once it serves.
    A path in the child's environment (READY_FILE), not a pipe handed over: passing descriptors is POSIX-only."""

    def __init__(self):
        handle, self.path = tempfile.mkstemp(prefix="llama-ready-", suffix=".txt")
        os.close(handle)

    def said(self) -> bool:
        """Whether the child has written that it serves."""
        try:
            return os.path.getsize(self.path) > 0
        except OSError:
            return False

    def remove(self):
        """Delete the file (a child that writes later finds nothing to write into)."""
        try:
            os.remove(self.path)
        except OSError:
            pass  # already gone; or, on Windows, the child has it open this instant: a few bytes left behind


def _say(text):
    try:
        os.write(sys.stdout.fileno(), text.encode())  # one write: never split by llama.cpp's own writes
    except (AttributeError, ValueError, OSError):
        pass  # no stdout (pythonw), or nobody reads it any more


def main(argv=None):
    """Start the server and keep this process alive until told to stop; exit 2 with one line on a bad flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_with_stdin = EXIT_WITH_STDIN in argv
    argv = [token for token in argv if token != EXIT_WITH_STDIN]
    try:
        params = server_params(argv)
    except FlagError as error:
        # One line, the whole of what this child prints: the supervisor leads its start error with it.
        _say(f"{REFUSED}{error}\n")
        os._exit(2)
    import xllamacpp

    signal.signal(signal.SIGTERM, _leave)
    signal.signal(signal.SIGINT, _leave)
    if exit_with_stdin:
        threading.Thread(target=_leave_when_parent_goes, daemon=True).start()
    try:
        server = xllamacpp.Server(params)
    except RuntimeError:
        # The model did not load, or the port was taken; llama.cpp has said why in its log. Not printed here: the
        # supervisor quotes llama.cpp's own error line, the one that says what is wrong. llama.cpp logs from a
        # thread of its own: give it a moment to write that line out before the process ends.
        time.sleep(LOG_SETTLE_S)
        os._exit(1)
    # Server() returns once the model is loaded and this process listens on the port: say so, so that the
    # supervisor knows a 200 there is ours and not another program's.
    say_serving(server.listening_address)
    try:
        while True:
            time.sleep(3600)
    finally:
        _leave()


if __name__ == "__main__":
    main()
