"""A changed models file applied while the gateway runs. The file is read whole: any problem refuses it (one log
line each) and the running models stay; else the difference is applied (the fleet's apply: models added,
removed, restarted once idle, updated in place) and logged in one line.

Triggers: a watcher thread that looks at the file about once a second and applies a burst of writes once the file
has been still for a moment; POST /models/reload (service/api/reload.py); SIGHUP, where the OS has it
(service/serve.py). One reload at a time: a trigger that finds one under way is refused (ReloadBusy), not queued.
"""
import logging
import os
import threading

from ..config import ConfigError
from .catalog import models_of_file
from .errors import LlamaStartError
from .models_file import ModelsFileError

log = logging.getLogger(__name__)

# How often the watcher looks at the file, and how long a changed file must stay still before it is read (an
# editor, or a copy, may write it in several steps).
POLL_S = 1.0
SETTLE_S = 0.5


class ReloadError(Exception):
    """A reload that changed nothing. problems: one line each; unavailable: the file is fine but a model it names
    could not be had (a fetch failed) or placed (the pool refused it), which a later try may cure."""

    def __init__(self, problems, unavailable=False):
        self.problems = tuple(problems)
        self.unavailable = unavailable
        super().__init__("\n".join(self.problems))


class ReloadBusy(ReloadError):
    """A reload asked for while another is under way (one may fetch a model for minutes): it is not queued."""

    def __init__(self):
        super().__init__(["a reload of the models file is under way; try again once it has ended"])


def file_signature(path):
    """What tells that a file changed (its modification time, size and inode), or None when it cannot be seen."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_mtime_ns, found.st_size, found.st_ino


class Reloader:
    """Re-reads the models file at path and applies it: apply(model_set) -> {"added": [...], "removed": [...],
    "changed": [...], "updated": [...]}; check_args as read_models_file's; seen: the file's signature when the
    running models were read (default: now)."""

    def __init__(self, path, apply, *, check_args=None, seen=None, poll_s=POLL_S, settle_s=SETTLE_S):
        self.path = path
        self.apply = apply
        self.check_args = check_args
        self.poll_s, self.settle_s = poll_s, settle_s
        self._seen = file_signature(path) if seen is None else seen
        self._lock = threading.Lock()  # one reload at a time
        self._stopping = threading.Event()
        self._watcher = None

    def reload(self, trigger: str) -> dict:
        """Read the file and apply what changed; return what was done. Raise ReloadError (nothing changed)."""
        # A trigger that finds one under way does not wait for it (nor hold a thread): the admin is told, a SIGHUP
        # is dropped, and the watcher sees a file changed meanwhile again at its next look.
        if not self._lock.acquire(blocking=False):
            log.warning("models reload skipped: another is under way", extra={"fields": {
                "trigger": trigger, "file": self.path}})
            raise ReloadBusy()
        try:
            self._seen = file_signature(self.path)  # this version is handled, whatever comes of it
            try:
                changes = self.apply(models_of_file(self.path, check_args=self.check_args))
            except ModelsFileError as error:  # a file's problems, or a model's file that is not GGUF
                raise self._refused(trigger, error.problems) from None
            except ConfigError as error:  # the routes refused the set
                raise self._refused(trigger, [f"{self.path}: {error}"]) from None
            except LlamaStartError as error:  # a new model's file could not be fetched
                raise self._refused(trigger, [f"{self.path}: {error}"], unavailable=True) from None
            except ValueError as error:  # the pool refused a model (on a port another has): nothing changed
                raise self._refused(trigger, [f"{self.path}: {error}"], unavailable=True) from None
        finally:
            self._lock.release()
        log.info("models reloaded", extra={"fields": {"trigger": trigger, "file": self.path, **changes}})
        return changes

    def _refused(self, trigger, problems, unavailable=False) -> ReloadError:
        for problem in problems:
            log.error("models file problem", extra={"fields": {"problem": problem}})
        log.warning("models reload refused: the running models stay", extra={"fields": {
            "trigger": trigger, "file": self.path, "problems": len(problems)}})
        return ReloadError(problems, unavailable)

    def reload_logged(self, trigger: str):
        """reload(), for a trigger with nobody to answer (the watcher, SIGHUP): every outcome is in the log."""
        try:
            self.reload(trigger)
        except ReloadError:
            pass  # logged, line by line (a reload skipped: in one)
        except Exception:  # noqa: BLE001 - a fault must not end the watcher: it is logged, the models stay
            log.exception("models reload failed", extra={"fields": {"trigger": trigger, "file": self.path}})

    def watch(self):
        """Start the watcher thread: a changed file is reloaded once it has been still for settle_s."""
        self._watcher = threading.Thread(target=self._watch, name="models-file-watch", daemon=True)
        self._watcher.start()
        return self

    def _watch(self):
        while not self._stopping.wait(self.poll_s):
            current = file_signature(self.path)
            if current == self._seen or self._lock.locked():
                continue  # unchanged, or a reload under way (which may read it): looked at again once it ends
            while not self._stopping.wait(self.settle_s):
                settled, current = current, file_signature(self.path)
                if current == settled:
                    if current != self._seen:  # else another trigger has read this version meanwhile
                        self.reload_logged("file changed")
                    break

    def stop(self):
        """Stop the watcher (a reload under way finishes first)."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(5)
