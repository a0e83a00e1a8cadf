"""Start llama.cpp as a child process, wait until it serves, restart it with backoff if it dies, stop it on exit."""
import collections
import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import requests

from ..models.errors import LlamaStartError
from ..models.names import model_name
from ..paths import PROJECT_ROOT
from .child import EXIT_WITH_STDIN, READY_FILE, REFUSED, ReadyFile
from .flags import command_line

log = logging.getLogger(__name__)

# Restart backoff: 1 s, doubling to 30 s; a child that served this long counts as healthy again.
RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 30.0
HEALTHY_RUN_S = 60.0
# llama.cpp's last lines (and at most how long each) for the operators' page, kept across restarts.
LINES_KEPT, LINE_KEPT = 300, 2000


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the OS for a port nobody is listening on."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# What a bind answers when another program holds the port; Windows says WSAEACCES when it holds it for sole use.
IN_USE = {errno.EADDRINUSE} | {getattr(errno, name) for name in ("WSAEADDRINUSE", "WSAEACCES")
                               if hasattr(errno, name)}


def port_in_use(host: str, port: int, *, windows=None) -> bool:
    """True when another program holds host:port, so that a llama.cpp started there could not listen (and its
    health checks would reach that program instead). windows: probe as on Windows (None: on Windows only)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError:
        return False  # an unknown host: llama.cpp says so itself
    with socket.socket(family, kind, proto) as probe:
        # POSIX: SO_REUSEADDR, so that connections of an earlier child lingering in TIME_WAIT are no conflict.
        # Windows: a plain bind. There SO_REUSEADDR would share a port in use (every probe free), and
        # SO_EXCLUSIVEADDRUSE fails while old connections linger, which a restart on the same port has.
        if not (os.name == "nt" if windows is None else windows):
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            return error.errno in IN_USE
    return False


# llama.cpp's log lines are "<time> <level> <text>", its errors at level E. Output without that prefix (a
# llama-server binary logs plain text by default) is searched for words that mark an error instead.
ERROR_WORDS = re.compile(r"\b(error|failed|invalid|cannot|couldn't|unable)\b", re.IGNORECASE)


def first_error(lines) -> str:
    """The line of llama.cpp's output that says what went wrong: the child's own refusal of a flag, else llama.cpp's
    first error, else its last line."""
    refused = next((line for line in lines if REFUSED in line), None)
    if refused is not None:
        return refused.split(REFUSED, 1)[1].strip()
    for line in lines:
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] == "E":
            return " ".join(parts[2].split())
    found = next((line for line in lines if ERROR_WORDS.search(line)), lines[-1] if lines else "")
    return " ".join(found.split()) or "it printed nothing"


def exit_reason(code: int) -> str:
    """How a child ended, in words: its exit code, or the signal that killed it (POSIX: a negative code)."""
    signals = {-number.value: number.name for number in signal.Signals} if os.name != "nt" else {}
    return f"killed by {signals[code]}" if code in signals else f"exited with code {code}"


def find_binary(configured: str = None):
    """Return the llama-server binary to run (LLAMA_SERVER_BIN, else one on PATH), or None for xllamacpp."""
    if configured:
        found = shutil.which(configured) or (configured if os.path.isfile(configured) else None)
        if not found:
            raise LlamaStartError(f"LLAMA_SERVER_BIN: no such program: {configured}")
        return found
    return shutil.which("llama-server")


def _die_with_parent():
    # Linux only: the child gets SIGTERM when the gateway dies, even by SIGKILL.
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LlamaSupervisor:
    """One supervised llama.cpp server for one model file."""

    def __init__(self, model_path, *, host="127.0.0.1", port=None, ctx=4096, parallel=2, threads=None,
                 threads_batch=None, batch=None, threads_http=12, embeddings=True, pooling="mean", alias=None,
                 binary=None, startup_timeout=300.0, cache_ram=None, args=()):
        self.model_path = model_path
        self.host = host
        self.port = port or free_port(host)
        self.port_chosen = not port  # picked free here, not set by LLAMA_PORT
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.ctx = ctx
        self.cache_ram = cache_ram  # MiB of host RAM for cached prompts; None: llama.cpp's default (8192)
        self.flags = ["--model", model_path, "--host", host, "--port", str(self.port), "--ctx-size", str(ctx),
                      "--parallel", str(parallel), "--metrics",
                      # The model's id in /v1/models: its file name without .gguf, never its full path.
                      "--alias", alias or model_name(model_path)]
        # llama.cpp's HTTP server ties a thread to each kept-alive connection until it has been idle for 5 s;
        # with fewer threads than the gateway pools connections, a new one waits those 5 s for a thread.
        for flag, value in (("--threads", threads), ("--threads-batch", threads_batch), ("--batch-size", batch),
                            ("--threads-http", threads_http)):
            if value:
                self.flags += [flag, str(value)]
        if cache_ram is not None:
            self.flags += ["--cache-ram", str(cache_ram)]
        if embeddings:
            self.flags += ["--embeddings"] + (["--pooling", pooling] if pooling else [])
        # More llama-server flags (a model's own args, then its projector and draft): after the gateway's, so that
        # where both set a flag the model's wins. A binary gets them verbatim; the child applies them through the
        # flag table and refuses, in one line naming it, a flag it does not know.
        self.args = tuple(str(token) for token in args)
        self.flags += self.args
        self.process = None
        self.restarts = 0  # restarts after the child died, over this supervisor's life; start() is not one
        self.last_exit = self.last_exit_at = None  # how and when (epoch s) the last child died on its own
        self.output = collections.deque(maxlen=40)  # the current child's lines, which say why a start failed
        self.lines = collections.deque(maxlen=LINES_KEPT)  # every child's, for the operators' page
        # The child of service.llama.child says when it serves; a llama-server binary cannot.
        self.says_serving = binary is None
        self._ready = None  # the ReadyFile the current child writes once it serves
        self._reader = None
        self._stopping = threading.Event()
        # Held while a child is being spawned: stop() takes it too, so it never misses a child being born.
        self._lock = threading.Lock()
        self._watcher = None
        self._started = threading.Event()  # set once the first child serves, or failed to (then _start_error)
        self._start_error = None
        # Told of a restart: on_state("restarting" | "ready" | "failed", detail), from the watcher's thread.
        self.on_state = None

    @classmethod
    def from_settings(cls, settings, model_path, **overrides):
        """Build a supervisor from the gateway's LLAMA_* settings; overrides (ctx, parallel, ...) win."""
        options = dict(host=settings["LLAMA_HOST"], port=settings["LLAMA_PORT"], ctx=settings["LLAMA_CTX"],
                       parallel=settings["LLAMA_PARALLEL"], threads=settings["LLAMA_THREADS"],
                       threads_batch=settings["LLAMA_THREADS_BATCH"], batch=settings["LLAMA_N_BATCH"],
                       threads_http=settings["LLAMA_THREADS_HTTP"] or settings["WAITRESS_THREADS"] + 4,
                       embeddings=settings["LLAMA_EMBEDDINGS"], binary=find_binary(settings["LLAMA_SERVER_BIN"]),
                       startup_timeout=settings["LLAMA_STARTUP_TIMEOUT_S"], cache_ram=settings["LLAMA_CACHE_RAM_MIB"])
        return cls(model_path, **{**options, **overrides})

    @property
    def url(self) -> str:
        """The base URL llama.cpp serves on."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def backend(self) -> str:
        """What runs llama.cpp: the binary's path, or xllamacpp."""
        return self.binary or "xllamacpp"

    def command(self) -> list:
        """The child's command line: the gateway's flags, then args."""
        if self.binary:
            return [self.binary, *self.flags]
        return [sys.executable, "-m", "service.llama.child", *self.flags, EXIT_WITH_STDIN]

    @property
    def command_line(self) -> str:
        """The whole command line as one string for display, quoted for this platform, secrets hidden."""
        return command_line(self.command(), program=None)

    def start(self):
        """Start llama.cpp, wait until its /health answers 200, then watch it; raise LlamaStartError on failure.
        A stopped supervisor may be started again."""
        start_all([self])
        return self

    def _reset(self):
        """Make ready for a start: the first one, or one after stop()."""
        if self._watcher is not None and self._watcher.is_alive():
            raise RuntimeError("this llama.cpp is already started; stop() it first")
        # stop() has joined the last watcher, so no thread still reads this event as "stopping".
        self._stopping.clear()
        self.output.clear()
        self._started.clear()
        self._start_error = None

    def _start_watching(self):
        self._watcher = threading.Thread(target=self._watch, name="llama-supervisor", daemon=True)
        self._watcher.start()

    def _wait_started(self):
        """Wait until the watcher's first child serves; raise what stopped it if it does not."""
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def _spawn(self) -> bool:
        """Start the child, unless stop() has begun: then start nothing and return False."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")])))
        options = {}
        if os.name == "nt":
            # Ctrl-C reaches only the gateway, which then stops the child itself.
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            options["start_new_session"] = True
            if sys.platform.startswith("linux"):
                options["preexec_fn"] = _die_with_parent
        with self._lock:
            # Checked under the lock stop() takes: either stop() comes first and nothing starts, or it waits
            # here and then ends the child started now.
            if self._stopping.is_set():
                return False
            if port_in_use(self.host, self.port):
                raise LlamaStartError(self._port_taken())
            self._ready = ReadyFile() if self.says_serving else None
            if self._ready is not None:
                env[READY_FILE] = self._ready.path
            try:
                self.process = subprocess.Popen(
                    self.command(), env=env, stdin=subprocess.DEVNULL if self.binary else subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **options)
            except BaseException:
                if self._ready is not None:
                    self._ready.remove()
                raise
            self.output.clear()  # an error is told from this child's lines, never from one that died before
            self.lines.append(f"[gateway] llama.cpp started, pid {self.process.pid}")
            self._reader = threading.Thread(target=self._read_output, args=(self.process,), daemon=True)
        self._reader.start()
        log.info("llama.cpp starting", extra={"fields": {"pid": self.process.pid, "backend": self.backend,
                                                         "port": self.port}})
        return True

    def _port_taken(self) -> str:
        where = f"port {self.port} on {self.host} is in use by another program, so llama.cpp cannot listen there"
        if self.port_chosen:
            return f"{where} (it was free when the gateway started); stop that program or restart the gateway"
        return f"{where}; stop that program, or set LLAMA_PORT to a free port (unset: one is picked)"

    def _read_output(self, process):
        # Keep the last lines for error reports; show them all only at DEBUG (they can be many).
        for line in iter(process.stdout.readline, b""):
            text = line.decode("utf-8", "replace").rstrip()
            self.output.append(text)
            self.lines.append(text[:LINE_KEPT])
            log.debug("llama.cpp output", extra={"fields": {"line": text}})

    def _exit_error(self) -> LlamaStartError:
        """Why the child ended while starting: llama.cpp's own error line first, in one line."""
        self._reader.join(2)  # its last lines, which say why, may still be in the pipe
        return LlamaStartError(f"llama.cpp exited with code {self.process.returncode} while loading "
                               f"{os.path.basename(self.model_path)}: {first_error(list(self.output))} "
                               "(LOG_LEVEL=debug logs all it printed)")

    def _answers(self) -> bool:
        # A 200 only says that something answers on the port. The child of service.llama.child says it serves once
        # it listens there; before that, whatever answers is another program.
        if self._ready is not None and not self._ready.said():
            return False
        try:
            return requests.get(self.url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout=None):
        """Poll llama.cpp's /health until it answers 200 (it answers 503 while loading the model)."""
        try:
            self._poll_ready(timeout)
        finally:
            if self._ready is not None:
                self._ready.remove()  # ready or not, it has said all it will: a child that did not is ended

    def _poll_ready(self, timeout):
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        delay = 0.02
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._exit_error()
            if self._answers():
                # Still running after its 200, else the 200 came from another program on its port (a binary
                # that could not listen there exits at once).
                if self.process.poll() is not None:
                    raise self._exit_error()
                return
            if self._stopping.wait(delay):
                raise LlamaStartError("llama.cpp was stopped while starting")
            delay = min(delay * 2, 0.05)  # a load that ends just after a check costs at most 50 ms more
        raise LlamaStartError(f"llama.cpp did not become ready within {timeout or self.startup_timeout:g} s "
                              "(LLAMA_STARTUP_TIMEOUT_S)")

    def _watch(self):
        # This thread spawns every child it watches. On Linux a child's parent-death signal is sent when the thread
        # that forked it ends, not the process: a child forked by a short-lived thread (a load on demand) would be
        # killed as soon as that thread finished.
        try:
            if not self._spawn():
                raise LlamaStartError("llama.cpp was stopped while starting")
            self.wait_ready()
        except BaseException as error:  # noqa: BLE001 - handed to the thread that waits in start_all
            self._start_error = error
            return
        finally:
            self._started.set()
        delay = RESTART_DELAY_S
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self.process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > HEALTHY_RUN_S:
                delay = RESTART_DELAY_S
            log.warning("llama.cpp exited; restarting", extra={"fields": {"exit_code": code, "restart_in_s": delay}})
            self.last_exit, self.last_exit_at = exit_reason(code), time.time()
            self._reader.join(1)  # its last words first, then the gateway's
            self.lines.append(f"[gateway] llama.cpp {self.last_exit}; restarting in {delay:g} s")
            self._tell("restarting", f"llama.cpp exited with code {code}")
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, RESTART_DELAY_MAX_S)
            try:
                if not self._spawn():  # a port taken meanwhile is a failed restart, tried again after the delay
                    return
                self.restarts += 1
                self.wait_ready()
                log.info("llama.cpp serving again", extra={"fields": {"restarts": self.restarts,
                                                                      "pid": self.process.pid}})
                self._tell("ready", None)
            except LlamaStartError as error:
                if self._stopping.is_set():
                    return  # stop() ended the child while it loaded: not a failure
                log.error("llama.cpp restart failed", extra={"fields": {"reason": str(error).splitlines()[0]}})
                self._tell("failed", str(error).splitlines()[0])
                # One that never became ready (still loading, or hung) is ended, so that the next turn of this
                # loop tries again rather than wait on it forever.
                self._end(self.process, 5.0)

    def _tell(self, state, detail):
        if self.on_state is not None:
            self.on_state(state, detail)

    def stop(self, timeout=10.0):
        """Stop watching and end the child: terminate, then kill if it does not leave within timeout. Returns
        once the watcher has finished, so no restart can follow, and start() may be called again."""
        self._stopping.set()
        with self._lock:
            process = self.process  # a spawn under way has finished: this is the last child there will be
        self._end(process, timeout)
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout)  # quick: with the child ended and _stopping set, every wait it makes returns

    def _end(self, process, timeout):
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdin:
            process.stdin.close()
        log.info("llama.cpp stopped", extra={"fields": {"pid": process.pid}})


def start_all(supervisors):
    """Start several llama.cpp servers at once (their models load side by side), wait until every one serves,
    then watch them; raise LlamaStartError (the others are stopped) if one does not come up."""
    for supervisor in supervisors:
        supervisor._reset()
    try:
        for supervisor in supervisors:
            supervisor._start_watching()
        for supervisor in supervisors:
            supervisor._wait_started()
    except BaseException:
        for supervisor in supervisors:
            supervisor.stop()
        raise
