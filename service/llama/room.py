"""Room for models: whether one more model fits beside those that hold a llama.cpp, within MODELS_MAX_LOADED and
MODELS_MEMORY_MIB, and which ones to unload to make room. Reads the models' states only; the pool (pool.py)
calls it under its lock and changes the states."""
from dataclasses import dataclass

from .pooled_model import DRAINING, FAILED, LOADED, LOADING, UNLOADING


def holds_room(model) -> bool:
    """True while a model holds (or is about to hold) a llama.cpp: loading, loaded, or crashed with its
    supervisor restarting it."""
    return model.state in (LOADING, LOADED) or (model.state == FAILED and model.restarting)


@dataclass(frozen=True)
class Room:
    """The limits: at most max_loaded models (0: no limit) and memory_mib MiB (None: no budget)."""

    max_loaded: int = 0
    memory_mib: int = None

    def excess(self, model, occupied) -> tuple:
        """(models, MiB) by which model beside occupied would go over the limits."""
        count = len(occupied) + 1 - self.max_loaded if self.max_loaded else 0
        mib = 0.0
        if self.memory_mib and model.need_mib:
            mib = sum(other.need_mib or 0 for other in occupied) + model.need_mib - self.memory_mib
        return max(0, count), max(0.0, mib)

    def shortfall(self, model, models):
        """None if model fits now; else (models, MiB) to unload beyond those already leaving ((0, 0) when it
        fits once they have left)."""
        staying = [other for other in models if holds_room(other)]
        leaving = [other for other in models if other.state in (DRAINING, UNLOADING)]
        if self.excess(model, staying + leaving) == (0, 0.0):
            return None
        return self.excess(model, staying)

    def too_big(self, model):
        """Why model could never load within MODELS_MEMORY_MIB, even alone; None when it could."""
        if self.memory_mib and model.need_mib and model.need_mib > self.memory_mib:
            return (f"it needs about {model.need_mib:,.0f} MiB (weights, KV cache, prompt cache), more than "
                    f"MODELS_MEMORY_MIB={self.memory_mib}")
        return None

    def never_fits(self, model, models) -> bool:
        """True when even unloading every model that is not pinned would not make room for model."""
        return self.excess(model, [other for other in models if other.pinned and holds_room(other)]) != (0, 0.0)

    def victims(self, models, extra_models, extra_mib) -> tuple:
        """(the models to unload for that shortfall, idle ones first, least recently used first; the reason: lru
        or memory). Never a pinned one, nor one whose waiters have yet to wake up and take it (it was loaded for
        them)."""
        candidates = sorted((other for other in models if not other.pinned and other.waiting == 0
                             and (other.state == LOADED or (other.state == FAILED and other.restarting))),
                            key=lambda other: (other.running > 0, other.last_used))
        reason = "lru" if extra_models > 0 else "memory"
        chosen = []
        for victim in candidates:
            if extra_models <= 0 and extra_mib <= 0:
                break
            chosen.append(victim)
            extra_models -= 1
            extra_mib -= victim.need_mib or 0
        return chosen, reason
