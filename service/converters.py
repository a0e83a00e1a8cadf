"""Converters for the settings table: each turns an environment string into a checked value or raises ValueError
with words that say what is wrong (and never repeat a secret)."""
import os
import re
from urllib.parse import urlsplit

def text(value):
    """A string, stripped."""
    return str(value).strip()


def port(value):
    """A TCP port number."""
    port = integer(value)
    if not 1 <= port <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return port


def integer(value):
    """A whole number (never a bool)."""
    if isinstance(value, bool):
        raise ValueError("must be a whole number")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a whole number, not {value!r}") from None


def count(value):
    """A whole number, 0 or more."""
    number = integer(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def positive_count(value):
    """A whole number, 1 or more."""
    number = integer(value)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


def seconds(value):
    """A finite number of seconds above 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number of seconds, not {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError("must be a number of seconds above 0")
    return number


def nonnegative_seconds(value):
    """A number of seconds, 0 allowed (0 means off)."""
    try:
        if float(value) == 0:
            return 0.0
    except (TypeError, ValueError):
        pass  # seconds() says what is wrong
    return seconds(value)


def flag(value):
    """On or off: 1/0, true/false, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be on or off (1/0, true/false), not {value!r}")


def public_url(value):
    """A URL as it may be shown: without any user:password@, even in a malformed URL.

    Everything between the scheme and the last '@' goes: a password may hold an unescaped '/', '?' or '#' that
    would end the host part early for urlsplit, and then stay in clear.
    """
    text = str(value)
    if "@" not in text:
        return text
    head, sep, rest = text.partition("://")
    if not sep:
        head, rest = "", text
    return head + sep + rest.rpartition("@")[2]


def shown_as(public):
    """Declare how a converter's values may be shown (logged): public(value) hides the credentials they can hold.
    Every setting that uses the converter is shown that way, whatever its name (config.Setting.shown)."""
    def declare(convert):
        convert.public = public
        return convert
    return declare


@shown_as(public_url)
def url(value):
    """An http(s) URL with a host, without its trailing slash; errors show it without its credentials."""
    url = str(value).strip().rstrip("/")
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and parts.hostname
    except ValueError:  # an unclosed [ of an IPv6 address
        usable = False
    if not usable:
        raise ValueError(f"must be an http:// or https:// URL such as http://127.0.0.1:8080, not "
                         f"{public_url(value)!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"has a bad port: {public_url(value)!r}") from None
    if "@" in parts.path + parts.query + parts.fragment:
        # An '@' past the host would make the URL's shown form (public_url) name another host.
        raise ValueError(f"has an '@' after its host {parts.hostname}; write it as %40")
    return url


# A model on Hugging Face: hf:OWNER/REPO[:QUANT] or hf:OWNER/REPO/FILE.gguf (service/models/hub.py fetches it).
HUB_PREFIX = "hf:"
_HUB_NAME = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,95}"
# The Hub's own rule for a repo id's two parts: no "--" or "..", nor a "." or "-" at either end.
_REPO_PART = r"(?![^/:]*(?:--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_MODEL = re.compile(rf"hf:(?P<repo>{_REPO_PART}/{_REPO_PART})(?::(?P<quant>[A-Za-z0-9][A-Za-z0-9._-]{{0,63}})"
                       rf"|/(?P<file>(?:{_HUB_NAME}/)*{_HUB_NAME}\.gguf))?")
HUB_FORMS = "hf:OWNER/REPO, hf:OWNER/REPO:QUANT or hf:OWNER/REPO/FILE.gguf"


def hub_model(value):
    """hf:OWNER/REPO[:QUANT] or hf:OWNER/REPO/FILE.gguf -> (repo, quant or None, file or None); no network."""
    match = HUB_MODEL.fullmatch(str(value).strip())
    if not match:
        raise ValueError(f"must be {HUB_FORMS}, such as hf:ggml-org/gemma-3-1b-it-GGUF, not {str(value).strip()!r}")
    return match["repo"], match["quant"], match["file"]


def model_file(value):
    """The absolute path of a file that exists, or a model on Hugging Face (hf:OWNER/REPO[:QUANT] or
    hf:OWNER/REPO/FILE.gguf), checked for its form only: it is fetched when bin/serve starts."""
    text = str(value).strip()
    if text.startswith(HUB_PREFIX):
        hub_model(text)
        return text
    return local_model_path(text)


def local_model_path(text: str) -> str:
    """The absolute path of a model file setting that names a file here; else ValueError saying what to write
    instead (a folder, or a Hugging Face name without hf:)."""
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; name a .gguf file in it, or set MODELS_DIR={path} instead to serve "
                         "every .gguf there")
    if os.path.isfile(path):
        return path
    # OWNER/REPO (or OWNER/REPO:QUANT) reads as a relative path; one folder and a .gguf name is more likely a path.
    looks_hub = HUB_MODEL.fullmatch(HUB_PREFIX + text) and not (text.count("/") == 1 and text.endswith(".gguf"))
    hint = f"; for a model on Hugging Face write {HUB_PREFIX}{text}" if looks_hub else ""
    raise ValueError(f"no such model file: {path}{hint}")


# Client ids and limit names: what may appear in logs and metric labels.
CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
LIMIT_NAMES = ("rpm", "tpm", "concurrent", "weight")  # weight: the client's turns per round (SCHEDULER=fair)


def api_key(value):
    """One API key: printable, no spaces."""
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
                raise ValueError(f"bad limit {limit!r} for {client}: use rpm=N, tpm=N, concurrent=N or weight=N")
            overrides[client][name] = int(number)
    return overrides


# Model names: what clients send as "model", and what may appear in logs, metric labels and response bodies.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
MODEL_OPTIONS = {"ctx": "positive", "parallel": "positive", "threads": "positive", "embeddings": "flag",
                 "rerank": "flag", "ttl": "count", "preload": "flag", "pin": "flag", "slots": "positive"}


def _model_name(name, entry):
    name = name.strip()
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(f"bad model name in {entry!r}: 1-128 of A-Z a-z 0-9 . _ : / @ + -, starting with a letter "
                         "or digit")
    return name


def _named_entries(value, what, shown=str):
    """name=thing,name=thing -> [(name, thing)], with each name once; errors show an entry as shown(entry)."""
    entries, seen = [], set()
    for entry in str(value).split(","):
        if not entry.strip():
            continue
        name, has_value, thing = entry.partition("=")
        if not has_value or not thing.strip():
            raise ValueError(f"bad entry {shown(entry.strip())!r}: the format is name={what},name={what}")
        name = _model_name(name, shown(entry.strip()))
        if name in seen:
            raise ValueError(f"model {name} is listed twice")
        seen.add(name)
        entries.append((name, thing.strip()))
    if not entries:
        raise ValueError(f"lists no model: the format is name={what},name={what}")
    return entries


def _public_entry(entry):
    """name=url|url as it may be shown: each URL without its credentials."""
    return "|".join(public_url(part) for part in entry.split("|"))


def public_upstreams(routes):
    """MODEL_UPSTREAMS as it may be shown: {"chat": [url, url]}, each URL without its credentials."""
    return {name: [public_url(replica) for replica in replicas] for name, replicas in routes.items()}


@shown_as(public_upstreams)
def model_upstreams(value):
    """chat=http://h1:8080|http://h2:8080,embed=http://h3:8080 -> {"chat": (url, url), "embed": (url,)}"""
    routes = {}
    for name, urls in _named_entries(value, "http://host:port|http://replica:port", shown=_public_entry):
        replicas = tuple(url(replica) for replica in urls.split("|") if replica.strip())
        if len(set(replicas)) != len(replicas):
            raise ValueError(f"model {name} lists a replica twice")
        routes[name] = replicas
    return routes


def model_paths(value):
    """chat=./models/a.gguf,embed=hf:OWNER/REPO:Q8_0 -> {"chat": "/abs/models/a.gguf", "embed": "hf:OWNER/REPO:Q8_0"}"""
    return {name: model_file(path) for name, path in _named_entries(value, "path/to/model.gguf")}


def model_names(value):
    """chat,embed -> ("chat", "embed")"""
    names = tuple(_model_name(name, value) for name in str(value).split(",") if name.strip())
    if not names:
        raise ValueError("lists no model: the format is name,name")
    return names


def model_settings(value):
    """embed:ctx=512:embeddings=on,chat:parallel=4 -> {"embed": {"ctx": 512, "embeddings": True}, ...}"""
    overrides = {}
    for entry in str(value).split(","):
        parts = entry.strip().split(":")
        # Names may hold ':' (qwen2.5:7b) but never '=': the options are the trailing parts with an '='.
        first_option = next((i for i, part in enumerate(parts) if "=" in part), len(parts))
        name, options = ":".join(parts[:first_option]), parts[first_option:]
        if not options or any("=" not in option for option in options):
            raise ValueError(f"bad entry {entry.strip()!r}: the format is model:option=value:..., with options "
                             f"{', '.join(MODEL_OPTIONS)}")
        name = _model_name(name, entry.strip())
        if name in overrides:
            raise ValueError(f"model {name} is listed twice")
        overrides[name] = {}
        for option in options:
            key, _, raw = option.partition("=")
            if key not in MODEL_OPTIONS:
                raise ValueError(f"unknown option {key!r} for {name}: use {', '.join(MODEL_OPTIONS)}")
            try:
                convert = {"flag": flag, "count": count, "positive": positive_count}[MODEL_OPTIONS[key]]
                overrides[name][key] = convert(raw)
            except ValueError as error:
                raise ValueError(f"{name}: {key} {error}") from None
    return overrides


def scheduler_mode(value):
    """How llama.cpp's slots are shared: fair (round robin over clients) or fifo (first come, first served)."""
    text = str(value).strip().lower()
    if text not in ("fair", "fifo"):
        raise ValueError("must be fair (each client its turn at llama.cpp's slots) or fifo (first come, first served)")
    return text


def failure_mode(value):
    """What to do when a store is unreachable: open or closed."""
    text = str(value).strip().lower()
    if text not in ("open", "closed"):
        raise ValueError("must be open (serve without the shared limit) or closed (refuse with 503)")
    return text


def redis_url(value):
    """A redis://, rediss:// or unix:// URL (never echoed: it may hold a password)."""
    text = str(value).strip()
    if urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        # Never echo it: the URL may carry a password.
        raise ValueError("must be a redis://, rediss:// or unix:// URL such as redis://127.0.0.1:6379/0")
    return text


@shown_as(public_url)
def database_url(value):
    """An sqlite:///PATH or postgresql://... URL (its password never echoed)."""
    text = str(value).strip()
    scheme = urlsplit(text).scheme.lower()
    if scheme.startswith("postgres"):
        return text
    if scheme == "sqlite" and text[len("sqlite:///"):] and ":memory:" not in text:
        return text  # not :memory:, which is one empty database per connection (the gateway's threads' own)
    raise ValueError("must be sqlite:///PATH (a file, made on first start; not :memory:) or "
                     "postgresql://USER:PASSWORD@HOST/DB")


def origins(value):
    """Comma-separated browser origins, or *."""
    origins = tuple(origin.strip().rstrip("/") for origin in str(value).split(",") if origin.strip())
    for origin in origins:
        if origin == "*":
            continue
        if "@" in origin:
            # A browser origin never holds user:password@: a mistake, and one not to repeat in clear.
            raise ValueError(f"{public_url(origin)!r} has a user:password@, which an origin never has")
        if urlsplit(origin).scheme not in ("http", "https"):
            raise ValueError(f"{origin!r} is not an origin such as https://app.example.com")
    return origins


def log_format(value):
    """json, text or auto."""
    text = str(value).strip().lower()
    if text not in ("auto", "json", "text"):
        raise ValueError("must be json, text or auto (json unless stderr is a terminal)")
    return text


def log_level(value):
    """A logging level name."""
    level = str(value).strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level
