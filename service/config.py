"""Settings: one declarative table, read from the environment once, with clear errors for bad values."""
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting has a value the gateway cannot use; the message names the variable and the problem."""


def _text(value):
    return str(value).strip()


def _port(value):
    port = _integer(value)
    if not 1 <= port <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return port


def _integer(value):
    if isinstance(value, bool):
        raise ValueError("must be a whole number")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a whole number, not {value!r}") from None


def _count(value):
    number = _integer(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _positive_count(value):
    number = _integer(value)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


def _seconds(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number of seconds, not {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError("must be a number of seconds above 0")
    return number


def _backoff(value):
    if value in ("0", 0, 0.0):
        return 0.0
    return _seconds(value)


def _flag(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be on or off (1/0, true/false), not {value!r}")


def _url(value):
    url = str(value).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL such as http://127.0.0.1:8080, not {value!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"has a bad port: {value!r}") from None
    return url


def _model_file(value):
    path = os.path.abspath(os.path.expanduser(str(value).strip()))
    if not os.path.isfile(path):
        raise ValueError(f"no such model file: {path}")
    return path


# Client ids and limit names: what may appear in logs and metric labels.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
LIMIT_NAMES = ("rpm", "tpm", "concurrent")


def _api_key(value):
    key = str(value)
    if not key or any(c.isspace() or not c.isprintable() for c in key):
        raise ValueError("must be one key with no spaces or control characters")
    return key


def _api_key_list(value):
    """key_a:team_a,key_b:team_b,key_c -> ((key_a, team_a), (key_b, team_b), (key_c, None)); never echoes a key."""
    pairs, seen = [], set()
    for position, entry in enumerate(str(value).split(","), start=1):
        key, has_client, client = entry.partition(":")
        if not key:
            raise ValueError(f"entry {position} has an empty key (the format is key:client_id,key,...)")
        _api_key(key)
        if ":" in client:
            raise ValueError(f"entry {position} has more than one ':' (keys and client ids may not contain ':')")
        if has_client:
            if not _CLIENT_ID.fullmatch(client):
                raise ValueError(f"entry {position} has a bad client id: 1-64 of A-Z a-z 0-9 . _ -")
        if key in seen:
            raise ValueError(f"entry {position} repeats an earlier key")
        seen.add(key)
        pairs.append((key, client or None))
    return tuple(pairs)


def _rate_limits(value):
    """team_a:rpm=600:tpm=200000,team_b:rpm=30 -> {"team_a": {"rpm": 600, "tpm": 200000}, "team_b": {"rpm": 30}}"""
    overrides = {}
    for entry in str(value).split(","):
        client, *limits = entry.strip().split(":")
        if not _CLIENT_ID.fullmatch(client) or not limits:
            raise ValueError(f"bad entry {entry!r}: the format is client:rpm=N:tpm=N:concurrent=N,...")
        if client in overrides:
            raise ValueError(f"client {client} is listed twice")
        overrides[client] = {}
        for limit in limits:
            name, _, number = limit.partition("=")
            if name not in LIMIT_NAMES or not number.isdigit():
                raise ValueError(f"bad limit {limit!r} for {client}: use rpm=N, tpm=N or concurrent=N")
            overrides[client][name] = int(number)
    return overrides


def _origins(value):
    origins = tuple(origin.strip().rstrip("/") for origin in str(value).split(",") if origin.strip())
    for origin in origins:
        if origin != "*" and urlsplit(origin).scheme not in ("http", "https"):
            raise ValueError(f"{origin!r} is not an origin such as https://app.example.com")
    return origins


def _log_format(value):
    text = str(value).strip().lower()
    if text not in ("auto", "json", "text"):
        raise ValueError("must be json, text or auto (json unless stderr is a terminal)")
    return text


def _log_level(value):
    level = str(value).strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


@dataclass(frozen=True)
class Setting:
    """One environment variable: its converter, its default (None means unset) and what it is for."""

    name: str
    convert: Callable[[Any], Any]
    default: Any
    help: str
    secret: bool = False  # never logged or shown


SETTINGS = (
    # The gateway itself.
    Setting("API_HOST", _text, "127.0.0.1", "address the gateway listens on; 0.0.0.0 serves the network"),
    Setting("API_PORT", _port, 8000, "port the gateway listens on"),
    Setting("WAITRESS_THREADS", _positive_count, 8, "worker threads; each open stream holds one for its life"),
    Setting("MAX_BODY_BYTES", _positive_count, 8 * 1024 * 1024, "largest request body accepted (413 above it)"),
    Setting("LOG_LEVEL", _log_level, "INFO", "DEBUG also shows llama.cpp's own log lines"),
    Setting("LOG_FORMAT", _log_format, "auto", "json (one object per line), text, or auto: text on a terminal"),
    # Access policy.
    Setting("OPENAI_API_KEY", _api_key, None, "one API key, for client id 'default'; no key at all = open access",
            secret=True),
    Setting("OPENAI_API_KEYS", _api_key_list, None, "several keys: key_a:team_a,key_b:team_b,key_c (id from a hash)",
            secret=True),
    Setting("METRICS_REQUIRE_KEY", _flag, False, "make /metrics ask for an API key like /v1 does"),
    Setting("RATE_LIMIT_RPM", _count, 0, "requests per rolling 60 s per client; 0 = no limit"),
    Setting("RATE_LIMIT_TPM", _count, 0, "tokens (prompt + completion) per rolling 60 s per client; 0 = no limit"),
    Setting("RATE_LIMIT_CONCURRENT", _count, 0, "requests in flight per client, streams included; 0 = no limit"),
    Setting("RATE_LIMITS", _rate_limits, None, "per-client overrides: team_a:rpm=600:tpm=200000,team_b:concurrent=2"),
    Setting("CORS_ORIGINS", _origins, None, "browser origins allowed to call the API, comma-separated; empty = none"),
    # The upstream llama-server.
    Setting("LLAMA_SERVER_URL", _url, None, "an existing llama-server to proxy; unset starts an embedded one"),
    Setting("LLAMA_API_KEY", _text, None, "key the gateway sends to a llama-server started with --api-key"),
    Setting("UPSTREAM_RETRIES", _count, 2, "retries on connect errors and 502/503/504 before any answer"),
    Setting("UPSTREAM_BACKOFF_S", _backoff, 0.25, "backoff factor: waits 0.25 s, 0.5 s, 1 s, ... between retries"),
    Setting("UPSTREAM_BACKOFF_MAX_S", _seconds, 8.0, "longest wait between retries, Retry-After included"),
    # Timeouts per route group: connect is the TCP connect, read is the longest silence while answering.
    Setting("CHAT_CONNECT_TIMEOUT_S", _seconds, 5.0, "connect timeout for /v1/chat/completions"),
    Setting("CHAT_READ_TIMEOUT_S", _seconds, 600.0, "read timeout for /v1/chat/completions (generation is slow)"),
    Setting("COMPLETIONS_CONNECT_TIMEOUT_S", _seconds, 5.0, "connect timeout for /v1/completions"),
    Setting("COMPLETIONS_READ_TIMEOUT_S", _seconds, 600.0, "read timeout for /v1/completions"),
    Setting("EMBEDDINGS_CONNECT_TIMEOUT_S", _seconds, 5.0, "connect timeout for /v1/embeddings"),
    Setting("EMBEDDINGS_READ_TIMEOUT_S", _seconds, 120.0, "read timeout for /v1/embeddings"),
    Setting("MODELS_CONNECT_TIMEOUT_S", _seconds, 2.0, "connect timeout for /v1/models and /health"),
    Setting("MODELS_READ_TIMEOUT_S", _seconds, 5.0, "read timeout for /v1/models and /health"),
    # The llama.cpp the gateway starts when LLAMA_SERVER_URL is unset.
    Setting("LLAMA_SERVER_BIN", _text, None, "llama-server binary to run; unset: llama-server on PATH, else xllamacpp"),
    Setting("LLAMA_MODEL", _model_file, None, "GGUF to serve; unset: first *.gguf in models/, else a demo model"),
    Setting("LLAMA_HOST", _text, "127.0.0.1", "address the embedded llama.cpp listens on"),
    Setting("LLAMA_PORT", _port, None, "port of the embedded llama.cpp; unset picks a free one"),
    Setting("LLAMA_CTX", _positive_count, 4096, "context size in tokens, shared by the parallel slots"),
    Setting("LLAMA_PARALLEL", _positive_count, 2, "parallel slots (requests decoded at once)"),
    Setting("LLAMA_THREADS", _positive_count, None, "CPU threads for generation; unset lets llama.cpp choose"),
    Setting("LLAMA_THREADS_BATCH", _positive_count, None, "CPU threads for prompt processing; unset = LLAMA_THREADS"),
    Setting("LLAMA_N_BATCH", _positive_count, None, "logical batch size for prompt processing; unset = 2048"),
    Setting("LLAMA_EMBEDDINGS", _flag, True, "serve /v1/embeddings (mean pooling) from the same model"),
    Setting("LLAMA_STARTUP_TIMEOUT_S", _seconds, 300.0, "how long to wait for the model to load"),
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
    keys = [key for key, _ in settings["OPENAI_API_KEYS"] or ()]
    if settings["OPENAI_API_KEY"] in keys:
        raise ConfigError("OPENAI_API_KEYS: repeats the key of OPENAI_API_KEY")
    return settings


def settings_summary(settings: Mapping[str, Any]) -> dict:
    """The settings as they may be logged: secrets show only whether they are set, and how many keys."""
    summary = {}
    for setting in SETTINGS:
        value = settings.get(setting.name)
        if setting.secret:
            value = len(value) if isinstance(value, tuple) else bool(value)
        summary[setting.name] = list(value) if isinstance(value, tuple) else value
    return summary


def route_timeouts(settings: Mapping[str, Any]) -> dict:
    """Map each route group to its (connect, read) timeout pair for requests."""
    return {
        group: (settings[f"{group.upper()}_CONNECT_TIMEOUT_S"], settings[f"{group.upper()}_READ_TIMEOUT_S"])
        for group in ROUTE_GROUPS
    }


def exit_on_config_error(error: ConfigError):
    """Stop the start with one line naming the variable and the problem, and a non-zero exit code."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2)
