"""What the gateway records about each request, and the one log line it writes when the request completes."""
import logging
import re
import time
import uuid
from dataclasses import dataclass

access_log = logging.getLogger("service.access")
log = logging.getLogger(__name__)

# An incoming x-request-id is kept only if it is this: safe to echo, log and forward.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Polled often; their lines are DEBUG unless they fail, and they stay out of the operators' list of the last
# requests (the page for operators, /ui, polls its state every couple of seconds).
QUIET_PATHS = ("/health", "/metrics", "/ui", "/ui/api/state", "/ui/api/history", "/ui/api/inflight")
QUIET_PREFIXES = ("/ui/static/", "/ui/api/models/")  # a model's llama.cpp log, polled while its panel is open
QUIET_READS = ("/admin/keys", "/admin/usage")  # read by the page every 10 s (a change to a key is logged)


# Paths are logged and listed up to this many characters: a path (up to waitress's 256 KiB of headers) is the
# client's to choose, and needs no key.
PATH_SHOWN = 200


def shown_path(path: str) -> str:
    """The path as logged: cut short, with an ellipsis, past PATH_SHOWN characters."""
    return path if len(path) <= PATH_SHOWN else path[:PATH_SHOWN] + "…"


def request_id_from(header) -> str:
    """Keep a sane incoming x-request-id, else make a new one."""
    if header and _SANE_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


@dataclass
class RequestRecord:
    """One request's facts for its log line; never its prompt, its completion or its key."""

    request_id: str
    method: str
    path: str
    started: float
    route: str = "unmatched"  # the URL rule: a bounded label for metrics
    client_id: str = None
    status: int = None
    upstream_ms: float = None
    ttft_ms: float = None
    prompt_tokens: int = None
    completion_tokens: int = None
    retries: int = None
    queue_ms: float = None  # how long it waited for a slot of its model (SCHEDULER=fair)
    affinity: str = None  # where it was placed among the model's replicas: hit, miss or overflow (affinity.py)
    max_tokens_lowered_from: int = None  # the client's output limit, where its model's ceiling lowered it
    error: str = None
    upstream_error: str = None  # the kind of upstream failure, for metrics
    rate_limited: str = None  # the limit that refused the request
    model: str = None  # the model it named, once known (also when no replica served it: a 404, a failed load)
    chunks_sent: int = 0  # stream events relayed so far (the page's tokens so far of a request in flight)
    kv_restored: int = None  # prompt tokens a saved conversation state gave it, not computed (service/warm)
    key_id: str = None  # the id of its key where the key is kept in the database (service/store)
    replica: object = None  # the routing.Replica that served it, released when the answer has been sent
    # Called with (entry, record) once its log line is written, but for quiet paths: the operators' last requests
    # (service/ui/recent.py) and whatever else keeps what the line says (app.extensions["request_sinks"]).
    sinks: tuple = ()

    def elapsed_ms(self) -> float:
        """Milliseconds since the request arrived."""
        return round((time.perf_counter() - self.started) * 1000, 2)

    def add_tokens(self, prompt, completion):
        """Take the token counts an answer reported (None for what it did not say)."""
        if prompt is not None:
            self.prompt_tokens = prompt
        if completion is not None:
            self.completion_tokens = completion

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens, as far as known."""
        return sum(n for n in (self.prompt_tokens, self.completion_tokens) if isinstance(n, int))

    def log(self):
        """Write the request's one log line."""
        quiet = (self.path in QUIET_PATHS or self.path.startswith(QUIET_PREFIXES)
                 or (self.method == "GET" and self.path in QUIET_READS)) and (self.status or 500) < 400
        fields = {"request_id": self.request_id, "client_id": self.client_id, "method": self.method,
                  "path": shown_path(self.path), "status": self.status, "duration_ms": self.elapsed_ms(),
                  "upstream_ms": self.upstream_ms, "ttft_ms": self.ttft_ms, "prompt_tokens": self.prompt_tokens,
                  "completion_tokens": self.completion_tokens, "retries": self.retries, "queue_ms": self.queue_ms,
                  "affinity": self.affinity, "max_tokens_lowered_from": self.max_tokens_lowered_from,
                  "kv_restored": self.kv_restored, "error": self.error}
        if self.model is not None:
            fields["model"] = self.model
        if self.replica is not None:
            fields["model"], fields["replica"] = self.replica.route.name or self.model, self.replica.label
        shown = {key: value for key, value in fields.items() if value is not None}
        access_log.log(logging.DEBUG if quiet else logging.INFO, "request", extra={"fields": shown})
        if self.sinks and not quiet:
            # What the log line says, and when the request came: never more (no prompt, no answer, no key).
            entry = {**shown, "route": self.route, "time": time.time() - shown["duration_ms"] / 1000}
            for sink in self.sinks:
                try:
                    sink(entry, self)
                except Exception:  # noqa: BLE001 - a sink that fails must not cost the request its close
                    log.exception("a request sink failed")
