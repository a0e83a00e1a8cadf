"""bin/serve-llama: run only the supervised llama.cpp, in the foreground, until Ctrl-C or SIGTERM."""
import signal
import sys
import threading

from ..logs import configure_logging
from ..serve import load_environment, make_supervisor
from .supervisor import LlamaStartError


def main() -> int:
    """Start llama.cpp with the LLAMA_* settings and keep it running (restarting it if it dies)."""
    settings = load_environment()
    configure_logging(settings["LOG_LEVEL"], settings["LOG_FORMAT"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    supervisor, model = make_supervisor(settings)
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
