"""Logging set-up for the gateway process: one format, one level, from LOG_LEVEL."""
import logging
import sys


def configure_logging(level: str = "INFO"):
    """Send log lines to stderr at level; keep chatty libraries at WARNING."""
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("gguf", "urllib3", "waitress.queue"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
