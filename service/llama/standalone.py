"""bin/serve-llama: run only the supervised llama.cpp, in the foreground, until Ctrl-C or SIGTERM."""
import signal
import sys
import threading

from ..operations.logs import configure_logging
from ..models.errors import LlamaStartError
from ..models.model_file import choose_model
from ..models.model_memory import fit_context
from ..serve import load_environment, warn_unknown_settings
from .supervisor import LlamaSupervisor


def main() -> int:
    """Start llama.cpp with the LLAMA_* settings and keep it running (restarting it if it dies)."""
    settings = load_environment()
    configure_logging(settings["LOG_LEVEL"], settings["LOG_FORMAT"])
    warn_unknown_settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        model = choose_model(settings["LLAMA_MODEL"])
        supervisor = LlamaSupervisor.from_settings(
            settings, model.path, ctx=fit_context(model.name, model.path, settings["LLAMA_CTX"]))
    except LlamaStartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        supervisor.start()
        print(f"llama.cpp ready on {supervisor.url} ({supervisor.backend}, model {model.path})\n"
              f"  run the gateway in front of it with: LLAMA_SERVER_URL={supervisor.url} python bin/serve",
              file=sys.stderr, flush=True)
        while not stop.wait(1):
            pass
    except LlamaStartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.stop()
    return 0
