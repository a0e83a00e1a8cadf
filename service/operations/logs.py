"""Logging for the gateway process: JSON objects one per line on stderr, or text for people at a terminal.

Structured fields travel in `extra={"fields": {...}}`; nothing here ever sees a prompt, a completion or a key.
"""
import json
import logging
import sys
import time


def _timestamp(record) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, then the record's fields."""

    def format(self, record):
        """Render record as a single-line JSON object."""
        line = {"ts": _timestamp(record), "level": record.levelname.lower(), "event": record.getMessage(),
                "logger": record.name}
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """A readable line: time, level, event, then key=value fields."""

    def format(self, record):
        """Render record as one line of text (plus a traceback, if any)."""
        fields = getattr(record, "fields", None) or {}
        text = " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
        line = f"{_timestamp(record)} {record.levelname:<7} {record.getMessage()}" + (f" {text}" if text else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def uses_json(log_format: str, stream=None) -> bool:
    """json, text, or auto: JSON unless the stream is a terminal."""
    if log_format == "auto":
        stream = stream or sys.stderr
        return not (hasattr(stream, "isatty") and stream.isatty())
    return log_format == "json"


def configure_logging(level: str = "INFO", log_format: str = "auto"):
    """Send every log line to stderr in one format at level; keep chatty libraries at WARNING."""
    # The logging HOWTO's optimizations: no line writes thread, process or source-file names, so do not
    # collect them for every record (the request line is on every request's path).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if uses_json(log_format) else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("gguf", "urllib3", "waitress.queue"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
