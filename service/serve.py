"""The gateway process behind bin/serve: settings, the embedded llama.cpp if needed, waitress, clean exit."""
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from . import create_app
from .config import (ConfigError, exit_on_config_error, load_settings, local_base_url, settings_summary,
                     unknown_settings)
from .converters import public_url
from .llama.fleet import Fleet
from .llama.launch import args_check, shown_files, supervisor_for
from .models.catalog import models_file_path, read_models
from .models.demo_model import DEMO_MODEL_NAME
from .models.errors import LlamaStartError
from .models.models_file import ModelsFileError
from .models.reload import Reloader, file_signature
from .operations.logs import configure_logging, uses_json
from .paths import MODELS_DIR, PROJECT_ROOT
from .policy.stored_keys import has_stored_keys
from .store import StoreError
from .proxy.routing import replica_urls
from .wsgi_server import make_server, stop_listening, stop_server

log = logging.getLogger("service")


ENV_FILE = os.path.join(PROJECT_ROOT, ".env")


def load_environment() -> dict:
    """Read .env from the project root (without overriding the real environment), then every setting."""
    from dotenv import load_dotenv

    load_dotenv(ENV_FILE, override=False)
    try:
        return load_settings(os.environ)
    except ConfigError as error:
        exit_on_config_error(error)


def with_local_defaults(settings) -> dict:
    """The settings with what bin/serve keeps beside the models filled in where unset: the key and usage database
    (an SQLite file) and the folder of saved conversation states."""
    models_dir = settings["MODELS_DIR"] or MODELS_DIR
    filled = dict(settings)
    if not filled["DATABASE_URL"]:
        from sqlalchemy.engine import URL

        # Built, not pasted: a folder named with '?' or '%' would otherwise be read as part of the URL.
        filled["DATABASE_URL"] = URL.create("sqlite", database=os.path.abspath(os.path.join(models_dir, "gateway.db"))
                                            ).render_as_string(hide_password=False)
    if not filled["KV_CACHE_DIR"]:
        filled["KV_CACHE_DIR"] = os.path.abspath(os.path.join(models_dir, ".kv"))
    return filled


def warn_unknown_settings(environ=os.environ, env_file=ENV_FILE):
    """Log one warning per variable that looks like a setting and is not one (RATE_LIMT_RPM would otherwise be
    ignored without a word), with the setting it is nearest to and where it was set."""
    from dotenv import dotenv_values

    in_file = dotenv_values(env_file) if os.path.isfile(env_file) else {}
    for name, nearest in unknown_settings(environ):
        log.warning("unknown setting ignored", extra={"fields": {
            "name": name, "did_you_mean": nearest, "source": ".env" if name in in_file else "environment",
            "settings": ".env.example"}})


# Why a port cannot be listened on, and the setting to change for each reason.
_LISTEN_ERRORS = {errno.EADDRINUSE: ("API_PORT", "{port} is in use on {host} (another program listens there); "
                                                 "choose a free port"),
                  errno.EACCES: ("API_PORT", "{port} needs privileges on {host}; choose a port above 1023"),
                  errno.EADDRNOTAVAIL: ("API_HOST", "{host} is no address of this machine")}


def check_listen_address(host: str, port: int, *, windows=None):
    """Stop the start with one line naming API_PORT (or API_HOST) when waitress could not listen there: checked
    before any model loads, which can take minutes. windows: probe as on Windows (None: on Windows only)."""
    try:
        addresses = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP,
                                       socket.AI_PASSIVE)
    except socket.gaierror as error:
        exit_on_config_error(ConfigError(f"API_HOST: cannot resolve {host}: {error.strerror}"))
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # POSIX: SO_REUSEADDR, as waitress binds (connections lingering in TIME_WAIT are no conflict). Windows:
            # no option. There SO_REUSEADDR would share a port in use (every probe free), and SO_EXCLUSIVEADDRUSE
            # fails while old connections linger, where waitress's own bind succeeds.
            if not (os.name == "nt" if windows is None else windows):
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as waitress
            try:
                probe.bind(address)
            except OSError as error:
                setting, words = _LISTEN_ERRORS.get(error.errno, ("API_PORT", "cannot listen on {host}:{port}: "
                                                                              + str(error.strerror)))
                exit_on_config_error(ConfigError(f"{setting}: " + words.format(host=host, port=port)))


def warn_unanswered_upstreams(models, settings):
    """Log one warning per llama-server run elsewhere (a model's upstreams) that does not answer /health now:
    requests to it fail until it comes up (not refused: it may come up later)."""
    import requests

    urls = [url for spec in models.specs for url in spec.upstreams]
    if not urls:
        return

    def problem(url):
        try:
            status = requests.get(url + "/health", timeout=(settings["MODELS_CONNECT_TIMEOUT_S"],
                                                            settings["MODELS_READ_TIMEOUT_S"])).status_code
        except requests.RequestException as error:
            return f"no answer ({type(error).__name__})"
        # 503 is llama-server loading its model: it answers.
        return None if status in (200, 503) else f"answered {status}, not llama-server's 200"

    with ThreadPoolExecutor(max_workers=min(8, len(urls))) as probes:
        for url, found in zip(urls, probes.map(problem, urls)):
            if found:
                log.warning("upstream does not answer /health", extra={"fields": {
                    "url": public_url(url), "problem": found, "note": "requests to it fail until it is up"}})


def stop_on_model_error(error):
    """Stop the start on a model that cannot be served: every problem of a models file, one line each (exit 1), a
    setting's one line (exit 2), or a model that cannot be had (exit 1)."""
    if isinstance(error, ModelsFileError):
        print("\n".join(error.problems), file=sys.stderr)
        raise SystemExit(1)
    if isinstance(error, ConfigError):
        exit_on_config_error(error)
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(1)


def load_models(settings) -> tuple:
    """The models to serve (the models file's, else the environment's) and the file's signature as read; stop the
    start with every problem found."""
    try:
        path = models_file_path(settings)
        seen = file_signature(path) if path else None  # before reading it: a change meanwhile is reloaded
        return read_models(settings, check_args=args_check(settings), fetch=True), seen
    except (ConfigError, LlamaStartError) as error:
        stop_on_model_error(error)
    except KeyboardInterrupt:  # Ctrl-C while a model downloads
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def make_fleet(models, settings) -> Fleet:
    """Prepare (not yet start) a llama.cpp per local model, fetching hf: files first."""
    try:
        return Fleet(models, settings)
    except (ConfigError, LlamaStartError) as error:
        stop_on_model_error(error)
    except KeyboardInterrupt:  # Ctrl-C while a model downloads
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def startup_facts(settings, models, fleet, store=None) -> dict:
    """What the gateway tells at startup: where to point a client and what answers behind it (no secrets)."""
    facts = {"base_url": f"{local_base_url(settings)}/v1"}
    specs = {spec.id: spec for spec in models.specs}
    local = {supervisor.url: (specs[name], supervisor) for name, supervisor in fleet.supervisors.items()}
    facts["demo_model"] = any(os.path.basename(supervisor.model_path) == DEMO_MODEL_NAME
                              for supervisor in fleet.supervisors.values())
    facts["models"] = [{"name": "any" if models.any_name else spec.id,
                        **({"aliases": list(spec.aliases)} if spec.aliases else {}),
                        "replicas": [_replica_facts(url, local) for url in replica_urls(spec, fleet.local_urls)]}
                       for spec in models.specs]
    if models.file:
        facts["models_file"] = models.file
    # Keys made at run time (bin/keys, /admin/keys) close the gateway as configured ones do.
    facts["open_access"] = not (settings["OPENAI_API_KEY"] or settings["OPENAI_API_KEYS"] or has_stored_keys(store))
    return facts


def _replica_facts(url, local) -> dict:
    if url not in local:
        return {"url": public_url(url), "kind": "external llama-server"}
    spec, supervisor = local[url]
    facts = {"url": url, "kind": f"embedded llama.cpp via {supervisor.backend}", "model": supervisor.model_path,
             "model_source": str(spec.origin)}
    if supervisor.process is not None and supervisor.process.poll() is None:
        facts["pid"] = supervisor.process.pid
    else:
        facts["loaded"] = False  # MODELS_MAX_LOADED: loaded by the first request that names it
    return facts


def banner(facts) -> str:
    """The startup lines for a person at a terminal."""
    lines = [f"llama.cpp gateway ready on {facts['base_url'][:-len('/v1')]}",
             f"  OpenAI base URL: {facts['base_url']}"]
    if facts.get("models_file"):
        lines.append(f"  models file: {facts['models_file']} (applied live when it changes)")
    for model in facts["models"]:
        for replica in model["replicas"]:
            pid = f", pid {replica['pid']}" if "pid" in replica else \
                ", loads on first request" if replica.get("loaded") is False else ""
            served = f"\n      serving {replica['model']} (from {replica['model_source']})" if "model" in replica else ""
            aliases = f" (aliases {', '.join(model['aliases'])})" if model.get("aliases") else ""
            lines.append(f"  model {model['name']}{aliases}: {replica['url']} ({replica['kind']}{pid}){served}")
    if facts.get("demo_model"):
        lines += ["  NOTE: this is the demo model: random weights, so its answers are noise.",
                  "        For real answers set LLAMA_MODEL=hf:ggml-org/gemma-3-1b-it-GGUF (fetched from Hugging Face)",
                  "        or put a GGUF file in models/."]
    if facts["open_access"]:
        lines += ["  WARNING: no API key is configured, so anyone who can reach this port can use it.",
                  "           Set OPENAI_API_KEY (or OPENAI_API_KEYS) to require one."]
    return "\n".join(lines)


def announce(settings, models, fleet, store=None):
    """Say the gateway is ready: a banner on a terminal, JSON events otherwise."""
    facts = startup_facts(settings, models, fleet, store)
    if uses_json(settings["LOG_FORMAT"]):
        log.info("ready", extra={"fields": facts})
        if facts.get("demo_model"):
            log.warning("demo model: random weights, answers are noise; set LLAMA_MODEL=hf:OWNER/REPO or put a GGUF "
                        "in models/")
        if facts["open_access"]:
            log.warning("open access: no API key is configured (set OPENAI_API_KEY or OPENAI_API_KEYS)")
    else:
        print(banner(facts), file=sys.stderr, flush=True)  # which says it for a person, the open access too


def raise_open_file_limit():
    """Raise this process's soft open-file limit to its hard limit, so that it can hold MAX_CONNECTIONS sockets;
    return the soft limit now in force, or None where the OS has no such limit (Windows)."""
    if os.name != "posix":
        return None  # Windows: no RLIMIT_NOFILE; waitress uses select() there, capped at 512 sockets by CPython
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # macOS reports an unlimited hard limit but refuses a soft one above its per-process cap: aim finite there.
    target = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # the OS refused: keep the soft limit there is, which the log line shows
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class SignalFlag:
    """Set by a signal (SIGTERM, Ctrl-C, SIGHUP), acted on by the main thread. A plain flag: a signal handler that
    took a lock could deadlock."""

    requested = False

    def __call__(self, signum, frame):
        self.requested = True


def run_until_stopped(app, server, settings, hangup=None, on_hangup=None) -> None:
    """Serve until SIGTERM or Ctrl-C, then shut down gracefully: refuse new work, drain, stop llama.cpp. Each time
    the hangup flag is set (SIGHUP), on_hangup runs in a thread of its own (a reload may fetch a model)."""
    stop = SignalFlag()
    signal.signal(signal.SIGTERM, stop)
    loop = threading.Thread(target=server.run, name="waitress-loop", daemon=True)
    loop.start()
    try:
        while not stop.requested and loop.is_alive():
            if hangup is not None and hangup.requested:
                hangup.requested = False
                threading.Thread(target=on_hangup, name="models-reload", daemon=True).start()
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    log.info("shutting down", extra={"fields": {"grace_s": settings["SHUTDOWN_GRACE_S"]}})
    stop_listening(server)
    app.extensions["lifecycle"].drain(settings["SHUTDOWN_GRACE_S"])
    stop_server(server)
    loop.join(5)


def check_models() -> int:
    """bin/serve --check: print the models the settings and the models file name, each local one with its
    llama.cpp's whole command line (an hf: file as written: nothing is fetched, nothing started), and return 0; or
    print every problem and return 1."""
    from dotenv import load_dotenv

    load_dotenv(ENV_FILE, override=False)
    try:
        settings = with_local_defaults(load_settings(os.environ))
        configure_logging(settings["LOG_LEVEL"], "text")  # a context capped to a model's trained length, say
        models = read_models(settings, check_args=args_check(settings))
        print(models_report(models, settings))
    except ModelsFileError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 1
    except (ConfigError, LlamaStartError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def models_report(models, settings) -> str:
    """The models as bin/serve --check prints them: each one's names, its llama-servers, its command line."""
    local = [spec for spec in models.specs if spec.source]
    port = settings["LLAMA_PORT"] if len(local) == 1 else None  # else a free port, as at start
    lines = [f"models from {models.file or 'the environment'}:"]
    for spec in models.specs:
        aliases = f" (aliases {', '.join(spec.aliases)})" if spec.aliases else ""
        name = spec.id if not models.any_name else f"any ({spec.id})" if spec.source else "any"
        lines.append(f"model {name}{aliases}")
        lines += [f"  llama-server at {public_url(url)}" for url in spec.upstreams]
        if spec.source:
            supervisor = supervisor_for(spec, settings, shown_files(spec), port=port,
                                        alias=None if models.any_name else spec.id)
            lines.append(f"  {supervisor.command_line}")
    return "\n".join(lines)


def make_reloader(models, settings, fleet, app, seen):
    """The models file's reloader (None when the models come from the environment, which cannot change under a
    running process), on the app for POST /models/reload."""
    reloader = None
    if models.file:
        reloader = Reloader(models.file, partial(fleet.apply, router=app.extensions["router"]),
                            check_args=args_check(settings), seen=seen)
    app.extensions["reloader"] = reloader
    return reloader


def main(check=False) -> int:
    """Run the gateway until Ctrl-C or SIGTERM; return the exit code. check: check_models() instead."""
    if check:
        return check_models()
    settings = with_local_defaults(load_environment())
    check_listen_address(settings["API_HOST"], settings["API_PORT"])  # before a model loads for minutes
    configure_logging(settings["LOG_LEVEL"], settings["LOG_FORMAT"])
    warn_unknown_settings()
    models, seen = load_models(settings)  # first: a bad ENABLED_MODELS stops the start with one line
    fleet = make_fleet(models, settings)
    warn_unanswered_upstreams(models, settings)
    log.info("config", extra={"fields": settings_summary(settings)})
    log.info("open files", extra={"fields": {"soft_limit": raise_open_file_limit()}})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # while llama.cpp loads: the finally stops it
    hangup, reloader, app = SignalFlag(), None, None
    try:
        # A pool even without local models when they come from a file: a reload may add some.
        app = create_app(settings, pool=fleet.pool if fleet.supervisors or models.file else None, models=models,
                         local_urls=fleet.local_urls)  # first: its metrics count the first loads
        reloader = make_reloader(models, settings, fleet, app, seen)
        if reloader is not None and hasattr(signal, "SIGHUP"):  # POSIX; without a file, SIGHUP ends it as ever
            signal.signal(signal.SIGHUP, hangup)
        fleet.start()
        server = make_server(app, host=settings["API_HOST"], port=settings["API_PORT"],
                             threads=settings["WAITRESS_THREADS"], max_body_bytes=settings["MAX_BODY_BYTES"],
                             max_connections=settings["MAX_CONNECTIONS"],
                             idle_timeout_s=settings["IDLE_CONNECTION_TIMEOUT_S"],
                             trusted_proxy=settings["TRUSTED_PROXY"])
        announce(settings, models, fleet, app.extensions.get("store"))
        if reloader is not None:
            reloader.watch()
        run_until_stopped(app, server, settings, hangup, reloader and partial(reloader.reload_logged, "SIGHUP"))
    except ConfigError as error:  # the routes refused the models
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StoreError as error:  # the key and usage database cannot be used (unreachable, newer than this gateway)
        print(f"error: DATABASE_URL: {error}", file=sys.stderr)
        return 2
    except LlamaStartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: cannot listen on {settings['API_HOST']}:{settings['API_PORT']}: {error.strerror}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        if reloader is not None:
            reloader.stop()
        fleet.stop()  # first: warm conversations save the slots of the models still loaded
        warm = app.extensions.get("warm") if app is not None else None
        if warm is not None:
            warm.stop()
        store = app.extensions.get("store") if app is not None else None
        if store is not None:
            store.close()  # the usage not yet written
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
