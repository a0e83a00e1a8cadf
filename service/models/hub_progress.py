"""The progress of a download from Hugging Face (hub.py): a tqdm bar for a person at a terminal, else log lines
at the start, each further 10 % and the end (JSON logs have no room for a bar)."""
import logging
import sys
import time

from tqdm import tqdm

from ..operations.logs import JsonFormatter

log = logging.getLogger("service.models.hub")  # the fetch's own logger: its lines read as the fetch's


def size_text(count: int) -> str:
    """A byte count as MiB or GiB."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def wants_bar() -> bool:
    """A bar is for a person: stderr is a terminal and the logs are text, not JSON."""
    json_logs = any(isinstance(handler.formatter, JsonFormatter) for handler in logging.getLogger().handlers)
    return sys.stderr.isatty() and not json_logs


class LogProgress:
    """Progress in the logs, without a bar: a line at the start, at each further 10 % and at the end.

    It stands in for tqdm where huggingface_hub takes a tqdm_class; update_transfer makes a Xet download report
    one measure (bytes written) rather than two bars.
    """

    file, part = "", "1/1"  # set for each download by progress_class

    def __init__(self, *, total=None, initial=0, **_tqdm_options):
        self.total, self.n, self._started, self._closed = total, initial, time.monotonic(), False
        self._tenth = self._tenths()
        self._log()

    def _tenths(self) -> int:
        return min(10, int(10 * self.n / self.total)) if self.total else 0

    def _log(self, **more):
        fields = {"file": self.file, "part": self.part, "bytes": self.n, "total_bytes": self.total,
                  "percent": int(100 * self.n / self.total) if self.total else None, **more}
        log.info("download", extra={"fields": fields})

    def update(self, n=1):
        """Count n more bytes; log when a new tenth of the file is reached."""
        self.n += n
        tenth = self._tenths()
        if self._tenth < tenth < 10:
            self._tenth = tenth
            self._log()

    def update_transfer(self, n):
        """Xet's network bytes: not shown, the bytes written are."""

    def set_postfix_str(self, *args, **kwargs):
        """Speed shown in a bar's postfix: the end line has the time taken instead."""

    set_transfer_postfix_str = set_postfix_str

    def refresh(self, *args, **kwargs):
        """Nothing to redraw."""

    def close(self):
        """Log the end line, once."""
        if not self._closed:
            self._closed = True
            self._log(seconds=round(time.monotonic() - self._started, 1), done=self.n == self.total)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class TerminalBar(tqdm):
    """tqdm's bar on stderr for a person: the file, its size, speed and time left."""

    file, part = "", "1/1"  # set for each download by progress_class

    def __init__(self, *args, **kwargs):
        kwargs.pop("name", None)
        kwargs["desc"] = self.file if self.part == "1/1" else f"{self.file} ({self.part})"
        super().__init__(*args, **kwargs)

    def update_transfer(self, n):
        """Xet's network bytes: not shown, the bytes written are."""

    def set_transfer_postfix_str(self, *args, **kwargs):
        """Xet's network speed: not shown."""


def progress_class(file: str, part: str, bar: bool) -> type:
    """The tqdm_class for one file's download: TerminalBar or LogProgress, naming the file and its part."""
    base = TerminalBar if bar else LogProgress
    return type(base.__name__, (base,), {"file": file, "part": part})
