"""Settings: one declarative table, read from the environment once, with clear errors for bad values."""
import difflib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .converters import (api_key, api_key_list, count, database_url, failure_mode, flag, log_format, log_level, model_file,
                         model_names, model_paths, model_settings, model_upstreams, nonnegative_seconds, origins, port,
                         positive_count, rate_limits, redis_url, scheduler_mode, seconds, text, url)


class ConfigError(ValueError):
    """A setting has a value the gateway cannot use; the message names the variable and the problem."""


@dataclass(frozen=True)
class Setting:
    """One environment variable: its converter, its default (None means unset) and what it is for."""

    name: str
    convert: Callable[[Any], Any]
    default: Any
    help: str
    secret: bool = False  # never logged or shown

    def shown(self, value):
        """The value as it may be logged: a secret says only whether it is set (or how many keys); a value whose
        converter declares a public form (URLs: without user:password@) is shown in that form; lists as lists."""
        if self.secret:
            return len(value) if isinstance(value, tuple) else bool(value)
        public = getattr(self.convert, "public", None)  # declared by the converter: converters.shown_as
        if public and value is not None:
            value = public(value)
        return list(value) if isinstance(value, tuple) else value


SETTINGS = (
    # The gateway itself.
    Setting("API_HOST", text, "127.0.0.1", "address the gateway listens on; 0.0.0.0 serves the network"),
    Setting("API_PORT", port, 8000, "port the gateway listens on"),
    Setting("WAITRESS_THREADS", positive_count, 128, "worker threads; each request holds one until answered (a stream "
            "for its life, a queued one while it waits); ~16 KiB each"),
    Setting("MAX_CONNECTIONS", positive_count, 4096, "open client connections waitress holds at most (idle and "
            "half-open ones count); past it, new ones wait in the listen queue"),
    Setting("IDLE_CONNECTION_TIMEOUT_S", positive_count, 30, "whole seconds before a connection with nothing running "
            "(idle, or its headers never finished) is dropped"),
    Setting("STREAM_STALL_TIMEOUT_S", nonnegative_seconds, 30.0, "seconds a stream's client may take no bytes "
            "before the stream is cut and llama.cpp's slot freed; 0 = never"),
    Setting("TRUSTED_PROXY", text, None, "the address of a reverse proxy in front (e.g. 127.0.0.1): its "
            "X-Forwarded-For names each client (the admin key's lockout, the logs); unset = the peer's address"),
    Setting("SHUTDOWN_GRACE_S", nonnegative_seconds, 30.0, "on SIGTERM or Ctrl-C, how long requests may finish"),
    Setting("MAX_BODY_BYTES", positive_count, 8 * 1024 * 1024, "largest request body accepted (413 above it)"),
    Setting("HEALTH_CACHE_S", nonnegative_seconds, 1.0, "how long /health reuses its probe of llama-server; 0 = a new probe per poll"),
    Setting("LOG_LEVEL", log_level, "INFO", "DEBUG also shows llama.cpp's own log lines"),
    Setting("LOG_FORMAT", log_format, "auto", "json (one object per line), text, or auto: text on a terminal"),
    # Access policy.
    Setting("OPENAI_API_KEY", api_key, None, "one API key, for client id 'default'; no key at all = open access",
            secret=True),
    Setting("OPENAI_API_KEYS", api_key_list, None, "several keys: key_a:team_a,key_b:team_b,key_c (id from a hash)",
            secret=True),
    Setting("METRICS_REQUIRE_KEY", flag, False, "make /metrics ask for an API key like /v1 does"),
    Setting("METRICS_INCLUDE_UPSTREAM", flag, False, "add llama-server's own llamacpp:* metrics to /metrics"),
    Setting("RATE_LIMIT_RPM", count, 0, "requests per rolling 60 s per client; 0 = no limit"),
    Setting("RATE_LIMIT_TPM", count, 0, "tokens (prompt + completion) per rolling 60 s per client; 0 = no limit"),
    Setting("RATE_LIMIT_CONCURRENT", count, 0, "requests in flight per client, streams included; 0 = no limit"),
    Setting("RATE_LIMITS", rate_limits, None, "per-client overrides: team_a:rpm=600:tpm=200000:weight=2,"
            "team_b:concurrent=2 (weight: turns per round at llama.cpp's slots)"),
    Setting("RATE_LIMIT_REDIS_URL", redis_url, None, "share the limits among gateway replicas through this Redis; "
            "unset = in memory", secret=True),
    Setting("RATE_LIMIT_REDIS_FAILURE", failure_mode, "open", "Redis unreachable: open (serve unlimited, warn) or closed "
            "(503)"),
    Setting("DATABASE_URL", database_url, None, "where keys made at run time (POST /admin/keys, bin/keys) and "
            "usage are kept: sqlite:///PATH or postgresql://...; unset = gateway.db in MODELS_DIR", secret=True),
    Setting("DATABASE_FAILURE", failure_mode, "open", "database unreachable: open (known keys keep working from "
            "the cache, usage waits in memory) or closed (503 for keys it cannot check)"),
    Setting("CORS_ORIGINS", origins, None, "browser origins allowed to call the API, comma-separated; empty = none"),
    # The upstream llama-server.
    Setting("LLAMA_SERVER_URL", url, None, "an existing llama-server to proxy; unset starts an embedded one"),
    Setting("LLAMA_API_KEY", text, None, "key the gateway sends to a llama-server started with --api-key",
            secret=True),
    Setting("UPSTREAM_RETRIES", count, 2, "retries on connect errors and 502/503/504 before any answer"),
    Setting("UPSTREAM_BACKOFF_S", nonnegative_seconds, 0.25, "backoff factor: 0.25 s, 0.5 s, 1 s, ... between retries"),
    Setting("UPSTREAM_BACKOFF_MAX_S", seconds, 8.0, "longest wait between retries, Retry-After included"),
    # Several models, several llama-servers.
    Setting("MODELS_FILE", text, None, "the models file (TOML, a [models.NAME] table per model, applied live when "
            "it changes); unset: models.toml in the project root if there is one, else the settings below"),
    Setting("MODEL_UPSTREAMS", model_upstreams, None, "route by model: chat=http://h1:8080|http://h2:8080,embed=http://h3:8080"),
    Setting("MODEL_PATHS", model_paths, None, "models bin/serve runs, one llama.cpp each: chat=./models/a.gguf,embed=hf:OWNER/REPO:Q8_0"),
    Setting("ENABLED_MODELS", model_names, None, "start only these of MODEL_PATHS (or of the *.gguf in models/): chat,embed"),
    Setting("MODEL_SETTINGS", model_settings, None, "per-model settings: embed:ctx=512:embeddings=on,chat:parallel=4:preload=on:pin=on:ttl=600,rank:rerank=on"),
    # Sharing llama.cpp's slots among clients.
    Setting("SCHEDULER", scheduler_mode, "fair", "fair: at most each llama-server's slots in flight, the rest queued "
            "per client and served round robin; fifo: straight on, first come first served"),
    Setting("QUEUE_TIMEOUT_S", seconds, 300.0, "longest wait for a slot before 503 queue_timeout"),
    Setting("QUEUE_MAX_PER_CLIENT", positive_count, 64, "requests one client may have waiting per model; beyond, "
            "429 queue_full"),
    # Models on demand (the ones bin/serve runs; never MODEL_UPSTREAMS or LLAMA_SERVER_URL).
    Setting("MODELS_MAX_LOADED", count, 0, "models loaded at once; a request for another loads it and unloads the "
            "least recently used idle one; 0 = every model loaded at start and kept"),
    Setting("MODELS_MEMORY_MIB", positive_count, None, "memory budget for loaded models, each estimated from its GGUF "
            "(weights + KV cache); unset = no budget"),
    Setting("MODEL_IDLE_TTL_S", nonnegative_seconds, 0.0, "unload a model unused this long (per model: "
            "MODEL_SETTINGS name:ttl=S); 0 = never"),
    Setting("ADMIN_API_KEY", api_key, None, "key for the admin routes (POST /models/load, /models/unload); unset = "
            "those routes are off", secret=True),
    Setting("REPLICA_EJECT_AFTER", positive_count, 3, "failures to take a request in a row that take a replica out of rotation"),
    Setting("REPLICA_COOLDOWN_S", seconds, 10.0, "how long an ejected replica rests before its /health is probed"),
    # Timeouts per route group: connect is the TCP connect, read is the longest silence while answering.
    Setting("CHAT_CONNECT_TIMEOUT_S", seconds, 5.0, "connect timeout for chat, /v1/responses and /v1/messages"),
    Setting("CHAT_READ_TIMEOUT_S", seconds, 600.0, "read timeout for chat, /v1/responses and /v1/messages (generation is slow)"),
    Setting("COMPLETIONS_CONNECT_TIMEOUT_S", seconds, 5.0, "connect timeout for /v1/completions and /infill"),
    Setting("COMPLETIONS_READ_TIMEOUT_S", seconds, 600.0, "read timeout for /v1/completions and /infill"),
    Setting("EMBEDDINGS_CONNECT_TIMEOUT_S", seconds, 5.0, "connect timeout for embeddings, rerank, tokenize and count_tokens"),
    Setting("EMBEDDINGS_READ_TIMEOUT_S", seconds, 120.0, "read timeout for embeddings, rerank, tokenize and count_tokens"),
    Setting("MODELS_CONNECT_TIMEOUT_S", seconds, 2.0, "connect timeout for /v1/models and /health"),
    Setting("MODELS_READ_TIMEOUT_S", seconds, 5.0, "read timeout for /v1/models and /health"),
    # The llama.cpp the gateway starts when LLAMA_SERVER_URL is unset.
    Setting("LLAMA_SERVER_BIN", text, None, "llama-server binary to run; unset: llama-server on PATH, else xllamacpp"),
    Setting("LLAMA_MODEL", model_file, None, "one GGUF to serve (a path, or hf:OWNER/REPO[:QUANT] from Hugging Face); "
            "unset: every *.gguf in MODELS_DIR, else a demo model"),
    Setting("MODELS_DIR", text, None, "where models are found and fetched ones kept; unset = models/ in the project"),
    Setting("LLAMA_HOST", text, "127.0.0.1", "address the embedded llama.cpp listens on"),
    Setting("LLAMA_PORT", port, None, "port of the embedded llama.cpp; unset picks a free one"),
    Setting("LLAMA_CTX", positive_count, 4096, "context size in tokens, shared by the parallel slots"),
    Setting("LLAMA_PARALLEL", positive_count, 2, "parallel slots (requests decoded at once)"),
    Setting("LLAMA_THREADS", positive_count, None, "CPU threads for generation; unset lets llama.cpp choose"),
    Setting("LLAMA_THREADS_BATCH", positive_count, None, "CPU threads for prompt processing; unset = LLAMA_THREADS"),
    Setting("LLAMA_THREADS_HTTP", positive_count, None, "llama.cpp's HTTP threads; unset = WAITRESS_THREADS + 4"),
    Setting("LLAMA_N_BATCH", positive_count, None, "logical batch size for prompt processing; unset = 2048"),
    Setting("LLAMA_CACHE_RAM_MIB", count, None, "host RAM each llama.cpp may fill with cached prompts (MiB; "
            "counted in MODELS_MEMORY_MIB); unset = llama.cpp's 8192, 0 = off"),
    Setting("LLAMA_EMBEDDINGS", flag, True, "serve /v1/embeddings (mean pooling) from the same model"),
    Setting("LLAMA_STARTUP_TIMEOUT_S", seconds, 300.0, "how long to wait for the model to load"),
    # Warm conversations: llama.cpp's slot states saved to disk and restored (local models, SCHEDULER=fair).
    Setting("KV_CACHE_DIR", text, None, "where computed prompts (llama.cpp slot states) are saved; unset = .kv/ in "
            "MODELS_DIR; safe to delete at any time"),
    Setting("KV_CACHE_DISK_MIB", count, 2048, "disk the saved states may take, least recently used deleted first; "
            "0 = warm conversations off"),
    Setting("KV_SAVE_MIN_TOKENS", positive_count, 1024, "a slot's state is saved only when it holds at least this "
            "many tokens"),
    Setting("KV_SAVE_INTERVAL_S", nonnegative_seconds, 30.0, "a busy slot's state is saved again at most this often "
            "(what a crash may lose); 0 = only when idle or unloaded"),
)

SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}

# Route groups and the settings that hold their (connect, read) timeouts.
ROUTE_GROUPS = ("chat", "completions", "embeddings", "models")


def load_settings(source: Mapping[str, Any] = None) -> dict:
    """Return every setting converted from source (the environment by default); raise ConfigError on a bad one.

    Strings are converted and checked; other values are taken as already converted.
    """
    source = os.environ if source is None else source
    settings = {}
    for setting in SETTINGS:
        raw = source.get(setting.name)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            settings[setting.name] = setting.default
            continue
        if not isinstance(raw, str):
            # Values given by code (a test, or bin/serve passing settings on) are taken as already converted.
            settings[setting.name] = raw
            continue
        try:
            settings[setting.name] = setting.convert(raw)
        except ValueError as error:
            raise ConfigError(f"{setting.name}: {error}") from None
    if settings["MODEL_UPSTREAMS"] and settings["LLAMA_SERVER_URL"]:
        raise ConfigError("MODEL_UPSTREAMS: set it or LLAMA_SERVER_URL, not both (MODEL_UPSTREAMS names every upstream)")
    keys = [key for key, _ in settings["OPENAI_API_KEYS"] or ()]
    if settings["OPENAI_API_KEY"] in keys:
        raise ConfigError("OPENAI_API_KEYS: repeats the key of OPENAI_API_KEY")
    if "admin" in [client for _, client in settings["OPENAI_API_KEYS"] or ()]:
        raise ConfigError("OPENAI_API_KEYS: the client id 'admin' is the admin key's (ADMIN_API_KEY); "
                          "name it otherwise")
    if settings["ADMIN_API_KEY"] and settings["ADMIN_API_KEY"] in [settings["OPENAI_API_KEY"], *keys]:
        raise ConfigError("ADMIN_API_KEY: must differ from every client key (a client key must never act as admin)")
    return settings


# Prefixes only the gateway's settings use: a variable under one that is not a setting is most likely a slip.
# (Not MODEL_: containers commonly set MODEL_NAME or MODEL_ID for themselves; a slip of MODEL_SETTINGS is close.)
OWN_PREFIXES = ("RATE_LIMIT", "LLAMA_", "MODELS_", "UPSTREAM_", "QUEUE_", "REPLICA_", "WAITRESS_", "KV_")
# Variables under those prefixes that other programs read: llama.cpp's own (LLAMA_ARG_CTX_SIZE, its log, its -hf
# cache) and llama-cpp-python's.
FOREIGN_PREFIXES = ("LLAMA_ARG_", "LLAMA_LOG_", "LLAMA_CACHE", "LLAMA_CPP_", "LLAMA_OFFLINE", "LLAMA_SERVER_SLOTS_")
# How alike (difflib's ratio) a name must be to a setting's to be taken for a slip of it. RATE_LIMT_RPM is 0.96;
# the OpenAI SDK's OPENAI_API_BASE is 0.83 to OPENAI_API_KEY, and PORT 0.67 to API_PORT: someone else's.
CLOSE, NEAREST = 0.85, 0.75


def unknown_settings(names) -> list:
    """(name, the setting it is nearest to or None) for each of names that looks like a setting and is not one:
    close to a setting's name (any case), or under a prefix only the gateway uses."""
    found = []
    for name in names:
        upper = name.upper()
        if name in SETTINGS_BY_NAME or upper.startswith(FOREIGN_PREFIXES):
            continue
        close = difflib.get_close_matches(upper, SETTINGS_BY_NAME, n=1, cutoff=CLOSE)
        if close or upper.startswith(OWN_PREFIXES):
            nearest = close or difflib.get_close_matches(upper, SETTINGS_BY_NAME, n=1, cutoff=NEAREST)
            found.append((name, nearest[0] if nearest else None))
    return found


def local_base_url(source: Mapping[str, Any]) -> str:
    """Where a client on this machine reaches a gateway listening on source's API_HOST and API_PORT (a wildcard
    address is reached on loopback); raise ConfigError on a bad one."""
    settings = load_settings({name: source.get(name) for name in ("API_HOST", "API_PORT")})
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(settings["API_HOST"], settings["API_HOST"])
    return f"http://{f'[{host}]' if ':' in host else host}:{settings['API_PORT']}"


def settings_summary(settings: Mapping[str, Any]) -> dict:
    """The settings as they may be logged: secrets show only whether they are set, URLs no credentials."""
    return {setting.name: setting.shown(settings.get(setting.name)) for setting in SETTINGS}


def route_timeouts(settings: Mapping[str, Any]) -> dict:
    """Map each route group to its (connect, read) timeout pair for requests."""
    return {
        group: (settings[f"{group.upper()}_CONNECT_TIMEOUT_S"], settings[f"{group.upper()}_READ_TIMEOUT_S"])
        for group in ROUTE_GROUPS
    }


# The headings of .env.example, before the setting each one starts.
_SECTIONS = {
    "API_HOST": "The gateway",
    "OPENAI_API_KEY": "Access policy: API keys, per-client limits, CORS (see docs/configuration.md)",
    "LLAMA_SERVER_URL": "The upstream llama-server",
    "MODELS_FILE": "Several models and replicas (see docs/models-file.md, and docs/operations.md, Scaling out)",
    "CHAT_CONNECT_TIMEOUT_S": "Timeouts per route group, in seconds (connect, and the longest silence while answering)",
    "LLAMA_SERVER_BIN": "The llama.cpp that bin/serve starts when LLAMA_SERVER_URL is unset",
    "KV_CACHE_DIR": "Warm conversations: computed prompts saved to disk across unloads, restarts and crashes",
}


def _shown(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return f"{value:g}" if isinstance(value, float) else str(value)


def render_env_example() -> str:
    """The text of .env.example: every setting with its help line and default."""
    lines = ["# Every setting of the gateway, with its default. Copy to .env and change what you need;",
             "# real environment variables win over this file. An empty value means the default.",
             "# (Generated by `python -m service.config > .env.example`.)"]
    for setting in SETTINGS:
        if setting.name in _SECTIONS:
            lines += ["", f"# {_SECTIONS[setting.name]}"]
        lines += [f"# {setting.help}", f"{setting.name}={_shown(setting.default)}"]
    return "\n".join(lines) + "\n"


def render_settings_table() -> str:
    """The settings table of docs/configuration.md (Markdown)."""
    rows = ["| Variable | Default | What it does |", "|---|---|---|"]
    for setting in SETTINGS:
        default = {None: "unset", True: "on", False: "off"}.get(setting.default, None) \
            if setting.default is None or isinstance(setting.default, bool) else _shown(setting.default)
        rows.append(f"| `{setting.name}` | {default} | {setting.help} |")
    return "\n".join(rows)


def exit_on_config_error(error: ConfigError):
    """Stop the start with one line naming the variable and the problem, and a non-zero exit code."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    print(render_env_example(), end="")
