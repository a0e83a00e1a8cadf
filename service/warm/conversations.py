"""The facade the request path calls for warm conversations: which models are warm (attach/detach), where their
llama.cpp saves states (slot_save_path), and what has happened (stats, counters). Per model, WarmModel plans and
restores before a request, and is told when one finished; the saver thread saves slots in the background.

post(base_url, path, json_body, timeout) -> (status, parsed json) is the one way it talks to llama.cpp."""
import collections
import os
import threading

from .budget import DiskBudget
from .model import Plan, WarmModel
from .saver import Saver

__all__ = ["Plan", "WarmConversations", "WarmModel"]

RESULTS = {"saves": ("ok", "failed", "skipped"), "restores": ("hit", "failed", "missing", "mismatch")}


class WarmConversations:
    """Every warm model of the gateway, their saved states under root (within disk_mib together) and the saver."""

    def __init__(self, root, disk_mib: int, min_tokens: int, interval_s: float, post, margin_bytes: int = None):
        self.root = root
        self.min_tokens, self.interval_s, self.post = min_tokens, interval_s, post
        self.budget = DiskBudget(root, disk_mib, margin_bytes)
        self.saver = Saver(self)
        self._models = {}
        self._counters = {}
        self._lock = threading.Lock()

    def start(self):
        """Start the saver thread."""
        self.saver.start()

    def stop(self):
        """Stop the saver thread."""
        self.saver.stop()

    def slot_save_path(self, identity: str) -> str:
        """The directory (made if missing) to give llama.cpp as --slot-save-path for a model of identity."""
        directory = self.budget.index(identity).directory
        os.makedirs(directory, exist_ok=True)
        return directory + os.sep

    def attach(self, name, base_url, identity, parallel, queue) -> WarmModel:
        """name's llama.cpp has (re)started at base_url: nothing is in its slots; queue hands out its slot ids."""
        model = WarmModel(self, name, base_url, identity, parallel, queue)
        with self._lock:
            self._models[name] = model
        return model

    def detach(self, name):
        """name's llama.cpp is gone (unloaded, stopped): its saved states stay on disk."""
        with self._lock:
            self._models.pop(name, None)

    def model(self, name):
        """The WarmModel of name, or None when it is not warm now."""
        with self._lock:
            return self._models.get(name)

    def models(self) -> list:
        """Every attached WarmModel."""
        with self._lock:
            return list(self._models.values())

    def save_all(self, name) -> int:
        """Save name's unsaved long slots now (before an unload, after the drain); how many were saved."""
        model = self.model(name)
        return self.saver.save_all(model) if model is not None else 0

    def count(self, name, family, result, tokens=0):
        """Count one save or restore of name (family: saves | restores; result: one of RESULTS[family])."""
        with self._lock:
            counters = self._counters.setdefault(name, _zero())
            counters[family][result] += 1
            counters["restored_tokens"] += tokens if family == "restores" else 0

    def counters(self) -> dict:
        """{model: {"saves": {result: n}, "restores": {result: n}, "restored_tokens": n}}, since the start."""
        with self._lock:
            return {name: {"saves": dict(counters["saves"]), "restores": dict(counters["restores"]),
                           "restored_tokens": counters["restored_tokens"]}
                    for name, counters in self._counters.items()}

    def stats(self) -> dict:
        """{model: {"states", "tokens", "bytes"}} of the saved states under root, also of models not loaded now
        (named as their index recorded; an index of no known name by its identity)."""
        stats = {}
        for index in self.budget.indexes():
            entries = index.entries().values()
            totals = stats.setdefault(index.model or index.identity, {"states": 0, "tokens": 0, "bytes": 0})
            totals["states"] += len(entries)
            totals["tokens"] += sum(entry["tokens"] for entry in entries)
            totals["bytes"] += sum(entry["bytes"] for entry in entries)
        return stats


def _zero():
    return {**{family: collections.Counter({result: 0 for result in results})
               for family, results in RESULTS.items()}, "restored_tokens": 0}
