"""A local stand-in for the Hugging Face Hub's HTTP API, the routes huggingface_hub calls to fetch a model:

- GET /api/models/OWNER/REPO/revision/REV (HfApi.model_info): the commit and the files, with their sizes;
- HEAD and GET /OWNER/REPO/resolve/REV/FILE (hf_hub_download): X-Repo-Commit, ETag and Content-Length, which
  it needs, and Range requests, with which it resumes a cut transfer;
- the Hub's errors as it sends them: X-Error-Code RepoNotFound (401 without a token, 404 with one), GatedRepo
  (401 without a token, 403 for a token without access), RevisionNotFound, EntryNotFound.

Every request is logged (method, path, Range, whether a token came); cut() and stall() break a file's next GET.
vision_repo() is the files of a vision model's repo: the model and its projector (mmproj) in two precisions.
"""
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from service.models.demo_model import write_demo_model

LISTING = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?")
RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")


def demo_gguf(tmp_path_factory, seed=0) -> bytes:
    """The bytes of a generated demo GGUF (a real model llama.cpp loads)."""
    path = tmp_path_factory.mktemp("hub-files") / f"demo-{seed}.gguf"
    write_demo_model(str(path), seed=seed)
    return path.read_bytes()


def projector_gguf(tmp_path_factory, precision: str = "f16") -> bytes:
    """The bytes of a small projector GGUF (general.architecture "clip", as llama.cpp's converter writes), a
    different one for each precision."""
    import gguf
    import numpy as np

    path = tmp_path_factory.mktemp("hub-files") / f"mmproj-{precision}.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "gemma3")
    writer.add_name(f"projector {precision}")
    writer.add_tensor("mm.input_projection.weight", np.ones((4, 4), dtype=np.float16 if "16" in precision else
                                                          np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def vision_repo(model: bytes, tmp_path_factory) -> dict:
    """The files of a vision model's repo, as ggml-org's are: the model, its projector in F16 and in Q8_0."""
    return {"vision-Q4_K_M.gguf": model, "mmproj-model-f16.gguf": projector_gguf(tmp_path_factory, "f16"),
            "mmproj-model-q8_0.gguf": projector_gguf(tmp_path_factory, "q8_0"), "README.md": b"# vision"}


@dataclass
class Repo:
    """One model repo: its files, who may read it, and its commit."""

    files: dict
    gated: bool = False
    private: bool = False
    tokens: tuple = ()  # tokens that may read it
    commit: str = field(default="")

    def __post_init__(self):
        self.commit = self.commit or hashlib.sha1(json.dumps(sorted(self.files)).encode()).hexdigest()


@dataclass
class Request:
    """One request the stand-in answered."""

    method: str
    path: str
    range: str = None
    token: bool = False


class FakeHub:
    """The stand-in, on a free local port: add_repo() what it serves, url for HF_ENDPOINT."""

    def __init__(self):
        self.repos, self.requests, self.faults = {}, [], {}
        self.stalled = threading.Event()  # set when a stall() has begun
        self.release = threading.Event()  # ends every stall()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def add_repo(self, repo: str, files: dict, **access) -> Repo:
        """Serve a repo of {filename: bytes}; access: gated, private, tokens."""
        self.repos[repo.lower()] = Repo(dict(files), **access)
        return self.repos[repo.lower()]

    def cut(self, filename: str, after: int, then=None):
        """The next GET of filename sends `after` bytes and drops the connection; then, the status of the GET
        after it (None: answered as usual)."""
        self.faults[filename] = ("cut", after, then)

    def stall(self, filename: str, after: int):
        """The next GET of filename sends `after` bytes and then waits, until release is set."""
        self.faults[filename] = ("stall", after, None)

    def gets(self, filename: str) -> list:
        """The Range header of each GET of filename, in order (None for a whole-file GET)."""
        return [r.range for r in self.requests if r.method == "GET" and r.path.endswith("/" + filename)]

    def stop(self):
        """Stop answering: the port refuses connections from now on."""
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    # The Hub's side.

    def _answer(self, handler, body):
        path = unquote(urlsplit(handler.path).path)
        token = (handler.headers.get("Authorization") or "").removeprefix("Bearer ") or None
        self.requests.append(Request(handler.command, path, handler.headers.get("Range"), bool(token)))
        listing, resolve = LISTING.fullmatch(path), RESOLVE.fullmatch(path)
        match = listing or resolve
        repo = self.repos.get(match["repo"].lower()) if match else None
        if not match:
            return self._error(handler, 404, None, "Not Found")
        if repo is None or (repo.private and token not in repo.tokens):
            return self._error(handler, 404 if token else 401, "RepoNotFound", "Repository not found")
        if match["rev"] not in (None, "main", repo.commit):
            return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
        if listing:
            siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(repo.files.items())]
            return self._send(handler, 200, {"Content-Type": "application/json"}, json.dumps(
                {"id": match["repo"], "sha": repo.commit, "private": repo.private, "gated": repo.gated and "manual",
                 "siblings": siblings}).encode(), body)
        if repo.gated and token not in repo.tokens:
            return self._error(handler, 403 if token else 401, "GatedRepo", "Access to this model is restricted")
        data = repo.files.get(match["file"])
        if data is None:
            return self._error(handler, 404, "EntryNotFound", "Entry not found")
        self._send_file(handler, repo, match["file"], data, body)

    def _send_file(self, handler, repo, name, data, body):
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start = 0
        wanted = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
        if wanted and body:
            start = int(wanted[1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        key = name if name in self.faults else name.rsplit("/", 1)[-1]  # a file is named with or without its folder
        fault = self.faults.pop(key, None) if body else None
        if fault and fault[0] == "cut" and fault[2]:
            self.faults[key] = ("status", 0, fault[2])
        if fault and fault[0] == "status":
            return self._error(handler, fault[2], None, "Internal Error")
        handler.send_response(206 if start else 200)
        for key, value in {**headers, "Content-Length": str(len(data) - start)}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if not body:
            return
        if fault:
            handler.wfile.write(data[start:start + fault[1]])
            handler.wfile.flush()
            if fault[0] == "stall":
                self.stalled.set()
                self.release.wait(30)
            handler.close_connection = True  # the rest never comes: the client sees a short body
            return
        handler.wfile.write(data[start:])

    def _error(self, handler, status, code, message):
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(handler, status, headers, json.dumps({"error": message}).encode(), handler.command == "GET")

    def _send(self, handler, status, headers, content, body):
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(content))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(content)


def point_huggingface_hub_at(stand_in, monkeypatch, tmp_path):
    """Point huggingface_hub at stand_in for one test: its endpoint, no token (none in the environment or on
    disk), online."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
