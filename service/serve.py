"""The gateway process behind bin/serve: settings, the embedded llama.cpp if needed, waitress, clean exit."""
import logging
import os
import signal
import sys

import waitress

from . import create_app
from .config import ConfigError, exit_on_config_error, load_settings
from .llama.model_file import choose_model
from .llama.supervisor import PROJECT_ROOT, LlamaStartError, LlamaSupervisor
from .logs import configure_logging

log = logging.getLogger("service")


def load_environment() -> dict:
    """Read .env from the project root (without overriding the real environment), then every setting."""
    from dotenv import load_dotenv

    load_dotenv(os.path.join(PROJECT_ROOT, ".env"), override=False)
    try:
        return load_settings(os.environ)
    except ConfigError as error:
        exit_on_config_error(error)


def make_supervisor(settings) -> tuple:
    """Choose the model and prepare (not yet start) the embedded llama.cpp; return (supervisor, model choice)."""
    model = choose_model(settings["LLAMA_MODEL"])
    try:
        return LlamaSupervisor.from_settings(settings, model.path), model
    except LlamaStartError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def banner(settings, supervisor=None, model=None) -> str:
    """The startup lines: where to point a client, and what answers behind the gateway."""
    host = settings["API_HOST"]
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    lines = [f"llama.cpp gateway ready on http://{shown_host}:{settings['API_PORT']}",
             f"  OpenAI base URL: http://{shown_host}:{settings['API_PORT']}/v1"]
    if supervisor:
        lines.append(f"  upstream:        {supervisor.url} (embedded llama.cpp via {supervisor.backend}, "
                     f"pid {supervisor.process.pid})")
        lines.append(f"  model:           {model.path} (from {model.source})")
        if model.is_demo:
            lines += ["  NOTE: this is the demo model: random weights, so its answers are noise.",
                      "        For real answers put a GGUF file in models/ or set LLAMA_MODEL=/path/to/model.gguf."]
    else:
        lines.append(f"  upstream:        {settings['LLAMA_SERVER_URL']} (external llama-server)")
    return "\n".join(lines)


def _stop_on_sigterm(signum, frame):
    # waitress's loop ends on SystemExit; the finally blocks below then stop llama.cpp.
    raise SystemExit(0)


def main() -> int:
    """Run the gateway until Ctrl-C or SIGTERM; return the exit code."""
    settings = load_environment()
    configure_logging(settings["LOG_LEVEL"])
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    supervisor = model = None
    if not settings["LLAMA_SERVER_URL"]:
        supervisor, model = make_supervisor(settings)
        settings["LLAMA_SERVER_URL"] = supervisor.url
    try:
        if supervisor:
            supervisor.start()
        app = create_app(settings)
        server = waitress.create_server(app, host=settings["API_HOST"], port=settings["API_PORT"],
                                        threads=settings["WAITRESS_THREADS"], ident="llama-gateway")
        print(banner(settings, supervisor, model), file=sys.stderr, flush=True)
        server.run()  # returns on SIGTERM or Ctrl-C, after waitress stops its threads
        server.close()
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
        if supervisor:
            supervisor.stop()
    log.info("gateway stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
