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

from . import create_app
from .config import (ConfigError, exit_on_config_error, load_settings, local_base_url, settings_summary,
                     unknown_settings)
from .converters import public_url
from .llama.fleet import Fleet, local_models
from .models.errors import LlamaStartError
from .operations.logs import configure_logging, uses_json
from .paths import PROJECT_ROOT
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


def check_listen_address(host: str, port: int):
    """Stop the start with one line naming API_PORT (or API_HOST) when waitress could not listen there: checked
    before any model loads, which can take minutes."""
    try:
        addresses = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP,
                                       socket.AI_PASSIVE)
    except socket.gaierror as error:
        exit_on_config_error(ConfigError(f"API_HOST: cannot resolve {host}: {error.strerror}"))
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            if os.name == "nt":
                # Windows lets SO_REUSEADDR (waitress sets it) share a port in use: probe for sole use instead.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
            else:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as waitress: TIME_WAIT is no conflict
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as waitress
            try:
                probe.bind(address)
            except OSError as error:
                setting, words = _LISTEN_ERRORS.get(error.errno, ("API_PORT", "cannot listen on {host}:{port}: "
                                                                              + str(error.strerror)))
                exit_on_config_error(ConfigError(f"{setting}: " + words.format(host=host, port=port)))


def warn_unanswered_upstreams(settings):
    """Log one warning per external llama-server that does not answer /health now: requests to it fail until it
    comes up (not refused: it may come up later)."""
    import requests

    urls = [url for urls in (settings["MODEL_UPSTREAMS"] or {None: (settings["LLAMA_SERVER_URL"],)}).values()
            for url in urls if url]
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


def make_fleet(settings):
    """Choose the local models and prepare (not yet start) their llama.cpp servers; None when there are none."""
    try:
        models = local_models(settings)
        return Fleet(models, settings) if models else None
    except ConfigError as error:
        exit_on_config_error(error)
    except LlamaStartError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C while a model downloads
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def startup_facts(settings, fleet=None) -> dict:
    """What the gateway tells at startup: where to point a client and what answers behind it (no secrets)."""
    facts = {"base_url": f"{local_base_url(settings)}/v1"}
    local = {}
    if fleet:
        local = {supervisor.url: (model, supervisor) for model, supervisor in zip(fleet.models, fleet.supervisors)}
        facts["demo_model"] = any(model.is_demo for model in fleet.models)
    routes = settings["MODEL_UPSTREAMS"] or {None: (settings["LLAMA_SERVER_URL"],)}
    facts["models"] = [{"name": name or "any", "replicas": [_replica_facts(url, local) for url in urls]}
                       for name, urls in routes.items()]
    facts["open_access"] = not (settings["OPENAI_API_KEY"] or settings["OPENAI_API_KEYS"])
    return facts


def _replica_facts(url, local) -> dict:
    if url not in local:
        return {"url": public_url(url), "kind": "external llama-server"}
    model, supervisor = local[url]
    facts = {"url": url, "kind": f"embedded llama.cpp via {supervisor.backend}", "model": model.path,
             "model_source": model.source}
    if supervisor.process is not None and supervisor.process.poll() is None:
        facts["pid"] = supervisor.process.pid
    else:
        facts["loaded"] = False  # MODELS_MAX_LOADED: loaded by the first request that names it
    return facts


def banner(facts) -> str:
    """The startup lines for a person at a terminal."""
    lines = [f"llama.cpp gateway ready on {facts['base_url'][:-len('/v1')]}",
             f"  OpenAI base URL: {facts['base_url']}"]
    for model in facts["models"]:
        for replica in model["replicas"]:
            pid = f", pid {replica['pid']}" if "pid" in replica else \
                ", loads on first request" if replica.get("loaded") is False else ""
            served = f"\n      serving {replica['model']} (from {replica['model_source']})" if "model" in replica else ""
            lines.append(f"  model {model['name']}: {replica['url']} ({replica['kind']}{pid}){served}")
    if facts.get("demo_model"):
        lines += ["  NOTE: this is the demo model: random weights, so its answers are noise.",
                  "        For real answers set LLAMA_MODEL=hf:ggml-org/gemma-3-1b-it-GGUF (fetched from Hugging Face)",
                  "        or put a GGUF file in models/."]
    if facts["open_access"]:
        lines += ["  WARNING: no API key is configured, so anyone who can reach this port can use it.",
                  "           Set OPENAI_API_KEY (or OPENAI_API_KEYS) to require one."]
    return "\n".join(lines)


def announce(settings, fleet):
    """Say the gateway is ready: a banner on a terminal, JSON events otherwise."""
    facts = startup_facts(settings, fleet)
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


class StopRequest:
    """Set by SIGTERM or Ctrl-C. A plain flag: a signal handler that took a lock could deadlock."""

    requested = False

    def __call__(self, signum, frame):
        self.requested = True


def run_until_stopped(app, server, settings) -> None:
    """Serve until SIGTERM or Ctrl-C, then shut down gracefully: refuse new work, drain, stop llama.cpp."""
    stop = StopRequest()
    signal.signal(signal.SIGTERM, stop)
    loop = threading.Thread(target=server.run, name="waitress-loop", daemon=True)
    loop.start()
    try:
        while not stop.requested and loop.is_alive():
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    log.info("shutting down", extra={"fields": {"grace_s": settings["SHUTDOWN_GRACE_S"]}})
    stop_listening(server)
    app.extensions["lifecycle"].drain(settings["SHUTDOWN_GRACE_S"])
    stop_server(server)
    loop.join(5)


def main() -> int:
    """Run the gateway until Ctrl-C or SIGTERM; return the exit code."""
    settings = load_environment()
    check_listen_address(settings["API_HOST"], settings["API_PORT"])  # before a model loads for minutes
    configure_logging(settings["LOG_LEVEL"], settings["LOG_FORMAT"])
    warn_unknown_settings()
    fleet = make_fleet(settings)  # first: a bad ENABLED_MODELS stops the start with one line
    warn_unanswered_upstreams(settings)  # the external ones, as set (before the local ones join the routes)
    log.info("config", extra={"fields": settings_summary(settings)})
    log.info("open files", extra={"fields": {"soft_limit": raise_open_file_limit()}})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # while llama.cpp loads: the finally stops it
    if fleet:
        settings.update(fleet.route_settings(settings))
    try:
        app = create_app(settings, pool=fleet.pool if fleet else None)  # first: its metrics count the first loads
        if fleet:
            fleet.start()
        server = make_server(app, host=settings["API_HOST"], port=settings["API_PORT"],
                             threads=settings["WAITRESS_THREADS"], max_body_bytes=settings["MAX_BODY_BYTES"],
                             max_connections=settings["MAX_CONNECTIONS"],
                             idle_timeout_s=settings["IDLE_CONNECTION_TIMEOUT_S"])
        announce(settings, fleet)
        run_until_stopped(app, server, settings)
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
        if fleet:
            fleet.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
