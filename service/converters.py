"""Converters for the settings table: each turns an environment string into a checked value or raises ValueError
with words that say what is wrong (and never repeat a secret)."""
import os
import re
from urllib.parse import urlsplit

def text(value):
    return str(value).strip()


def port(value):
    port = integer(value)
    if not 1 <= port <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return port


def integer(value):
    if isinstance(value, bool):
        raise ValueError("must be a whole number")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a whole number, not {value!r}") from None


def count(value):
    number = integer(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def positive_count(value):
    number = integer(value)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


def seconds(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number of seconds, not {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError("must be a number of seconds above 0")
    return number


def nonnegative_seconds(value):
    if value in ("0", 0, 0.0):
        return 0.0
    return seconds(value)


def flag(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be on or off (1/0, true/false), not {value!r}")


def url(value):
    url = str(value).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL such as http://127.0.0.1:8080, not {value!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"has a bad port: {value!r}") from None
    return url


def model_file(value):
    path = os.path.abspath(os.path.expanduser(str(value).strip()))
    if not os.path.isfile(path):
        raise ValueError(f"no such model file: {path}")
    return path


# Client ids and limit names: what may appear in logs and metric labels.
CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
LIMIT_NAMES = ("rpm", "tpm", "concurrent")


def api_key(value):
    key = str(value)
    if not key or any(c.isspace() or not c.isprintable() for c in key):
        raise ValueError("must be one key with no spaces or control characters")
    return key


def api_key_list(value):
    """key_a:team_a,key_b:team_b,key_c -> ((key_a, team_a), (key_b, team_b), (key_c, None)); never echoes a key."""
    pairs, seen = [], set()
    for position, entry in enumerate(str(value).split(","), start=1):
        key, has_client, client = entry.partition(":")
        if not key:
            raise ValueError(f"entry {position} has an empty key (the format is key:client_id,key,...)")
        api_key(key)
        if ":" in client:
            raise ValueError(f"entry {position} has more than one ':' (keys and client ids may not contain ':')")
        if has_client:
            if not CLIENT_ID.fullmatch(client):
                raise ValueError(f"entry {position} has a bad client id: 1-64 of A-Z a-z 0-9 . _ -")
        if key in seen:
            raise ValueError(f"entry {position} repeats an earlier key")
        seen.add(key)
        pairs.append((key, client or None))
    return tuple(pairs)


def rate_limits(value):
    """team_a:rpm=600:tpm=200000,team_b:rpm=30 -> {"team_a": {"rpm": 600, "tpm": 200000}, "team_b": {"rpm": 30}}"""
    overrides = {}
    for entry in str(value).split(","):
        client, *limits = entry.strip().split(":")
        if not CLIENT_ID.fullmatch(client) or not limits:
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


def origins(value):
    origins = tuple(origin.strip().rstrip("/") for origin in str(value).split(",") if origin.strip())
    for origin in origins:
        if origin != "*" and urlsplit(origin).scheme not in ("http", "https"):
            raise ValueError(f"{origin!r} is not an origin such as https://app.example.com")
    return origins


def log_format(value):
    text = str(value).strip().lower()
    if text not in ("auto", "json", "text"):
        raise ValueError("must be json, text or auto (json unless stderr is a terminal)")
    return text


def log_level(value):
    level = str(value).strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level
