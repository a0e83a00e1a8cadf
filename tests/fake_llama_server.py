"""A stand-in llama-server for tests that run bin/serve with LLAMA_SERVER_BIN: it serves --host:--port, answers
/health, /v1/models, /props and the four generation APIs (chat, completions, Responses, Messages; JSON, or SSE when
the body says stream) in llama-server's shapes, and records what it was given.

Run as a program (through the wrapper install() writes, since LLAMA_SERVER_BIN names one executable file):
- FAKE_LLAMA_RECORD names a folder; each process writes <pid>.jsonl there: {"argv": [...]} first, then
  {"path", "body"} per POST, {"stream": "last"|"cut", "path", "chunks"} per stream (as its last event goes out,
  or where the client cut it), {"exit": signal} on SIGTERM. One file per process: appends of several processes
  to one file are not atomic everywhere.
- FAKE_LLAMA_DELAY_S: seconds between the chunks of a stream (0 by default), for tests that act meanwhile.
A stream has as many content chunks as the body's output limit asks (4 without one, 200 at most).

Imported, it writes no file and starts nothing: install() and records() are for the tests.
"""
import http.server
import json
import os
import signal
import sys
import threading
import time

LIMIT_FIELDS = ("n_predict", "max_completion_tokens", "max_tokens", "max_output_tokens")
DEFAULT_CHUNKS, MAX_CHUNKS = 4, 200
PROMPT_TOKENS = 3


def install(folder) -> str:
    """Write an executable wrapper running this stand-in with this Python into folder; return its path, for
    LLAMA_SERVER_BIN (which names one program, run with the flags as its arguments)."""
    script = os.path.abspath(__file__)
    if os.name == "nt":
        path = os.path.join(folder, "llama-server.cmd")
        with open(path, "w", newline="\r\n") as wrapper:
            wrapper.write(f'@echo off\n"{sys.executable}" "{script}" %*\n')
    else:
        path = os.path.join(folder, "llama-server")
        with open(path, "w") as wrapper:
            # exec: the pid the gateway sees, and ends, is the stand-in's own.
            wrapper.write(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
        os.chmod(path, 0o755)
    return path


def records(folder) -> list:
    """Every stand-in process that ran, in start order: {"pid", "argv", "bodies": [(path, body)], "streams",
    "exited"}."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if not name.endswith(".jsonl"):
            continue
        process = {"pid": int(name[:-len(".jsonl")]), "argv": None, "bodies": [], "streams": [], "exited": None}
        with open(os.path.join(folder, name), encoding="utf-8") as lines:
            for line in lines:
                if not line.endswith("\n"):
                    break  # being written now
                entry = json.loads(line)
                if "argv" in entry:
                    process["argv"], process["started"] = entry["argv"], entry["time"]
                elif "body" in entry:
                    process["bodies"].append((entry["path"], entry["body"]))
                elif "stream" in entry:
                    process["streams"].append(entry)
                elif "exit" in entry:
                    process["exited"] = entry["exit"]
        found.append(process)
    return sorted(found, key=lambda process: process.get("started", 0))


def flag(argv, name, default=None):
    """The value after flag name in argv (its last use, as llama-server reads it), else default."""
    places = [index for index, token in enumerate(argv) if token == name]
    return argv[places[-1] + 1] if places and places[-1] + 1 < len(argv) else default


class Recorder:
    """Appends one JSON line per event to this process's record file (none without FAKE_LLAMA_RECORD)."""

    def __init__(self, folder):
        self.fd = None
        if folder:
            self.fd = os.open(os.path.join(folder, f"{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def write(self, **entry):
        """Append one line in one write: no lock, so that the SIGTERM handler, which may interrupt a write (or
        itself, when a second SIGTERM follows), never waits for one."""
        if self.fd is not None:
            os.write(self.fd, (json.dumps({**entry, "time": time.time()}) + "\n").encode())


def chunk_count(body) -> int:
    """How many content chunks to send: the body's output limit (the first one set), within bounds."""
    for name in LIMIT_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and value >= 0:
            return min(value, MAX_CHUNKS)
    return DEFAULT_CHUNKS


def sse(data, event=None) -> bytes:
    """One SSE event: data as JSON (or as given, for [DONE]), with an event: line for the typed APIs."""
    text = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "").encode() + f"data: {text}\n\n".encode()


def usage_openai(n):
    """OpenAI's usage object for n generated tokens."""
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}


def chat_answer(model, n, stream):
    """A chat completion (a list of SSE events when stream)."""
    text = " x" * n
    if not stream:
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length"}], "usage": usage_openai(n), "timings": {"predicted_n": n}}
    head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    events = [sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None},
                                         "finish_reason": None}]})]
    events += [sse({**head, "choices": [{"index": 0, "delta": {"content": " x"}, "finish_reason": None}]})
               for _ in range(n)]
    events.append(sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
    events.append(sse({**head, "choices": [], "usage": usage_openai(n), "timings": {"predicted_n": n}}))
    return events + [sse("[DONE]")]


def completion_answer(model, n, stream):
    """A text completion (a list of SSE events when stream; its last chunk carries usage, as llama-server's)."""
    head = {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": model}
    if not stream:
        return {**head, "choices": [{"index": 0, "text": " x" * n, "finish_reason": "length", "logprobs": None}],
                "usage": usage_openai(n), "timings": {"predicted_n": n}}
    events = [sse({**head, "choices": [{"index": 0, "text": " x", "finish_reason": None}]}) for _ in range(n)]
    events.append(sse({**head, "choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                       "usage": usage_openai(n)}))
    return events + [sse("[DONE]")]


def response_answer(model, n, stream):
    """A Responses API answer (a list of typed SSE events when stream, without the indexes llama.cpp omits)."""
    usage = {"input_tokens": PROMPT_TOKENS, "output_tokens": n, "total_tokens": PROMPT_TOKENS + n,
             "input_tokens_details": {"cached_tokens": 0}}
    part = {"type": "output_text", "text": " x" * n, "annotations": []}
    item = {"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant", "content": [part]}
    whole = {"id": "resp_fake", "object": "response", "created_at": int(time.time()), "status": "completed",
             "model": model, "output": [item], "usage": usage}
    if not stream:
        return whole
    started = {**whole, "status": "in_progress", "output": [], "usage": None}
    events = [sse({"type": "response.created", "response": started}, "response.created"),
              sse({"type": "response.in_progress", "response": started}, "response.in_progress"),
              sse({"type": "response.output_item.added", "item": {**item, "status": "in_progress", "content": []}},
                  "response.output_item.added"),
              sse({"type": "response.content_part.added", "item_id": "msg_fake",
                   "part": {**part, "text": ""}}, "response.content_part.added")]
    events += [sse({"type": "response.output_text.delta", "item_id": "msg_fake", "delta": " x"},
                   "response.output_text.delta") for _ in range(n)]
    events += [sse({"type": "response.output_text.done", "item_id": "msg_fake", "text": part["text"]},
                   "response.output_text.done"),
               sse({"type": "response.content_part.done", "item_id": "msg_fake", "part": part},
                   "response.content_part.done"),
               sse({"type": "response.output_item.done", "item": item}, "response.output_item.done"),
               sse({"type": "response.completed", "response": whole}, "response.completed")]
    return events


def message_answer(model, n, stream):
    """An Anthropic Messages answer (a list of typed SSE events when stream)."""
    whole = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
             "content": [{"type": "text", "text": " x" * n}], "stop_reason": "max_tokens", "stop_sequence": None,
             "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": n}}
    if not stream:
        return whole
    start = {**whole, "content": [], "stop_reason": None,
             "usage": {"input_tokens": PROMPT_TOKENS, "cache_read_input_tokens": 0, "output_tokens": 0}}
    events = [sse({"type": "message_start", "message": start}, "message_start"),
              sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                  "content_block_start")]
    events += [sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " x"}},
                   "content_block_delta") for _ in range(n)]
    events += [sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
               sse({"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                    "usage": {"output_tokens": n}}, "message_delta"),
               sse({"type": "message_stop"}, "message_stop")]
    return events


# llama-server's paths for each API (it answers several spellings), and the answer each gives.
ANSWERS = {path: answer for paths, answer in (
    (("/v1/chat/completions", "/chat/completions"), chat_answer),
    (("/v1/completions", "/completions", "/completion"), completion_answer),
    (("/v1/responses", "/responses"), response_answer),
    (("/v1/messages", "/messages"), message_answer),
) for path in paths}


def make_handler(argv, recorder, delay_s):
    """The request handler of one stand-in, serving the model argv names."""
    alias = flag(argv, "--alias") or os.path.basename(flag(argv, "--model", "model.gguf"))
    slots, ctx = int(flag(argv, "--parallel", "1")), int(flag(argv, "--ctx-size", "4096"))

    class Handler(http.server.BaseHTTPRequestHandler):
        """llama-server's routes, HTTP/1.1 with keep-alive as llama-server's."""

        protocol_version = "HTTP/1.1"

        def do_GET(self):
            """Health, the model list, /props and /metrics."""
            path = self.path.split("?")[0]
            if path in ("/health", "/v1/health"):
                self.send_json(200, {"status": "ok"})
            elif path in ("/v1/models", "/models"):
                self.send_json(200, {"object": "list", "data": [{
                    "id": alias, "object": "model", "created": int(time.time()), "owned_by": "llamacpp",
                    "meta": {"n_ctx_train": 131072, "n_ctx": ctx // slots}}]})
            elif path == "/props":
                self.send_json(200, {"total_slots": slots, "default_generation_settings": {"n_ctx": ctx // slots},
                                     "model_alias": alias})
            elif path == "/metrics":
                self.send_text(200, "llamacpp:requests_processing 0\nllamacpp:requests_deferred 0\n")
            else:
                self.send_error_json(404, "File Not Found", "not_found_error")

        def do_HEAD(self):
            """200 with no body, for any path."""
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            """Record the body, then answer the API its path names."""
            path = self.path.split("?")[0]
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw)
            except ValueError:
                recorder.write(path=path, body=None, raw=raw.decode("utf-8", "replace"))
                return self.send_error_json(400, "bad JSON", "invalid_request_error")
            recorder.write(path=path, body=body)
            answer = ANSWERS.get(path)
            if path == "/v1/messages/count_tokens":
                return self.send_json(200, {"input_tokens": PROMPT_TOKENS})
            if answer is None or not isinstance(body, dict):
                return self.send_error_json(404, "File Not Found", "not_found_error")
            made = answer(body.get("model") or alias, chunk_count(body), bool(body.get("stream")))
            if isinstance(made, dict):
                return self.send_json(200, made)
            self.stream(path, made)

        def stream(self, path, events):
            """Send events chunked, delay_s apart; record when the last one goes out, or where the client cut it."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for number, event in enumerate(events):
                if number and delay_s:
                    time.sleep(delay_s)
                if number == len(events) - 1:
                    # Recorded before it is sent: once the client has it, the gateway may end this process at once.
                    recorder.write(stream="last", path=path, chunks=number)
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                except OSError:
                    recorder.write(stream="cut", path=path, chunks=number)
                    self.close_connection = True
                    return
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                self.close_connection = True  # the client had the whole stream and closed first

        def send_json(self, status, data):
            """Answer data as JSON."""
            self.send_text(status, json.dumps(data), "application/json")

        def send_error_json(self, status, message, kind):
            """Answer llama-server's error envelope."""
            self.send_json(status, {"error": {"code": status, "message": message, "type": kind}})

        def send_text(self, status, text, content_type="text/plain"):
            """Answer text with its length."""
            payload = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            """Log no access lines: the gateway keeps the binary's output for its error reports."""

    return Handler


def _end_with_parent():
    # Windows runs the wrapper (a .cmd) in cmd.exe, which the gateway ends; its child, this process, would live on.
    import ctypes

    kernel = ctypes.windll.kernel32
    handle = kernel.OpenProcess(0x00100000, False, os.getppid())  # SYNCHRONIZE
    if handle:
        kernel.WaitForSingleObject(handle, 0xFFFFFFFF)  # INFINITE
        os._exit(0)


def main(argv) -> int:
    """Serve as llama-server would on --host:--port, recording argv and what arrives."""
    recorder = Recorder(os.environ.get("FAKE_LLAMA_RECORD"))
    recorder.write(argv=argv)

    def on_term(signum, frame):
        """Record the signal, then end at once."""
        recorder.write(exit=signum)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    if os.name == "nt":
        threading.Thread(target=_end_with_parent, daemon=True).start()
    handler = make_handler(argv, recorder, float(os.environ.get("FAKE_LLAMA_DELAY_S") or 0))
    server = http.server.ThreadingHTTPServer((flag(argv, "--host", "127.0.0.1"), int(flag(argv, "--port", "8080"))),
                                             handler)
    server.daemon_threads = True
    print(f"main: server is listening on http://{server.server_address[0]}:{server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


# For the tests: a box of one bin/serve's files, and what they ask of processes.

# The settings that say which models exist (beside a models file, any of them stops the start), and the
# stand-in's own: a test run's values are kept from the bin/serve under test.
MODEL_SETTINGS = ("LLAMA_MODEL", "MODEL_PATHS", "MODEL_SETTINGS", "ENABLED_MODELS", "MODEL_UPSTREAMS",
                  "LLAMA_SERVER_URL", "LLAMA_SERVER_BIN", "MODELS_FILE", "FAKE_LLAMA_DELAY_S", "FAKE_LLAMA_RECORD")
ADMIN = "sk-admin-e2e-0123456789"


def quoted(text) -> str:
    """text as a TOML basic string (JSON's escapes are TOML's): Windows paths keep their backslashes."""
    return json.dumps(str(text))


class Box:
    """A models file, the stand-in's wrapper and record folder, and a MODELS_DIR, all in one folder."""

    def __init__(self, folder):
        self.root = folder  # a pathlib.Path (tmp_path)
        self.file = folder / "models.toml"
        self.record = folder / "record"
        self.models_dir = folder / "models"
        for made in (folder / "bin", self.record, self.models_dir):
            made.mkdir()
        self.binary = install(str(folder / "bin"))

    def env(self, binary=True, **more) -> dict:
        """The environment of a bin/serve on this box: the file, the stand-in (unless binary is False: the
        embedded llama.cpp), small llama.cpp settings, offline, an admin key."""
        env = {"MODELS_FILE": str(self.file), "MODELS_DIR": str(self.models_dir), "FAKE_LLAMA_RECORD": str(self.record),
               "LLAMA_CTX": "1024", "LLAMA_PARALLEL": "2", "LLAMA_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "ADMIN_API_KEY": ADMIN, "LLAMA_STARTUP_TIMEOUT_S": "30"}
        if binary:
            env["LLAMA_SERVER_BIN"] = self.binary
        else:
            env["PATH"] = path_without_llama_server()
        return {**env, **more}

    def processes(self, alias=None) -> list:
        """The stand-ins that ran (of the model named alias), in start order."""
        return [process for process in records(str(self.record))
                if alias is None or flag(process["argv"] or [], "--alias") == alias]


def path_without_llama_server() -> str:
    """PATH without the folders holding a llama-server, so that bin/serve runs the embedded llama.cpp."""
    import shutil

    return os.pathsep.join(folder for folder in os.environ.get("PATH", "").split(os.pathsep)
                           if not shutil.which("llama-server", path=folder))


def pid_alive(pid) -> bool:
    """Whether process pid still runs (a zombie, which only waits to be reaped, does not)."""
    if os.name == "nt":
        import ctypes

        kernel = ctypes.windll.kernel32
        handle = kernel.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:  # Linux: a zombie is as good as gone
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
