"""Settings: one declarative table, read from the environment once, with clear errors for bad values."""
import os
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


SETTINGS = (
    # The gateway itself.
    Setting("API_HOST", _text, "127.0.0.1", "address the gateway listens on; 0.0.0.0 serves the network"),
    Setting("API_PORT", _port, 8000, "port the gateway listens on"),
    Setting("WAITRESS_THREADS", _positive_count, 8, "worker threads; each open stream holds one for its life"),
    Setting("MAX_BODY_BYTES", _positive_count, 8 * 1024 * 1024, "largest request body accepted (413 above it)"),
    Setting("LOG_LEVEL", _log_level, "INFO", "DEBUG also shows llama.cpp's own log lines"),
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
    """Return every setting converted from source (the environment by default); raise ConfigError on a bad one."""
    source = os.environ if source is None else source
    settings = {}
    for setting in SETTINGS:
        raw = source.get(setting.name)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            settings[setting.name] = setting.default
            continue
        try:
            settings[setting.name] = setting.convert(raw)
        except ValueError as error:
            raise ConfigError(f"{setting.name}: {error}") from None
    return settings


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
