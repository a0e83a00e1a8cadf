"""One description of a model, whichever reader made it (the models file, the environment), and the difference
between two sets of them that a reload applies."""
import json
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Optional, Tuple, Union


@dataclass(frozen=True)
class Origin:
    """Where a spec was written: a file and line, or "environment"; for messages only."""

    file: str
    line: Optional[int] = None

    def __str__(self) -> str:
        """FILE:LINE, or the file alone when there is no line."""
        return self.file if self.line is None else f"{self.file}:{self.line}"


ENVIRONMENT = Origin("environment")


@dataclass(frozen=True)
class Limits:
    """Ceilings on what a client may ask of the model: applied, never refused."""

    max_tokens: Optional[int] = None  # larger asks are lowered to it
    strip: Tuple[str, ...] = ()  # request fields removed before llama.cpp sees them


@dataclass(frozen=True)
class ModelSpec:
    """One model: its names, where it runs (a local file, an hf: spec, upstreams, or a local file and upstreams as
    replicas of one model), how llama.cpp starts it, its lifecycle in the pool, and its request rules.

    None means "the gateway's default" (LLAMA_CTX, LLAMA_PARALLEL, MODEL_IDLE_TTL_S, ...), so a spec from the
    environment and one from the file agree when they say the same. Paths are absolute by the time a spec exists.
    """

    id: str
    source: Optional[str] = None  # an absolute path or hf:OWNER/REPO[:QUANT]; None: upstreams only
    upstreams: Tuple[str, ...] = ()  # URLs of llama-servers run elsewhere
    aliases: Tuple[str, ...] = ()
    args: Tuple[str, ...] = ()  # llama-server flags, verbatim
    mmproj: Optional[str] = None  # "auto" (from the source's hf: repo), an absolute path, or an hf: spec
    draft: Optional[str] = None  # a draft model for speculative decoding: an absolute path or an hf: spec
    ctx: Optional[int] = None
    parallel: Optional[int] = None
    threads: Optional[int] = None
    embeddings: Optional[bool] = None
    rerank: bool = False
    ttl: Union[int, float, None] = None  # idle seconds before unloading; None: MODEL_IDLE_TTL_S; 0: never
    pin: bool = False
    preload: bool = False
    slots: Optional[int] = None  # the scheduler's turns at once; None: llama.cpp's parallel
    # (field, JSON text) pairs, sorted: immutable and hashable, and each use gets its own copy (default_fields).
    defaults: Tuple[Tuple[str, str], ...] = ()
    limits: Limits = Limits()
    # Not part of what the model is: the same model moved down the file is no change.
    origin: Origin = field(default=ENVIRONMENT, compare=False)

    def default_fields(self) -> dict:
        """The request fields to set when the client sent none, as a fresh dict the caller may change."""
        return {name: json.loads(text) for name, text in self.defaults}

    def names(self) -> Tuple[str, ...]:
        """Every name a client may send for this model: its id, then its aliases."""
        return (self.id, *self.aliases)

    def identity(self) -> tuple:
        """What makes its llama.cpp process what it is: two specs of one id with the same identity share a process,
        and whatever else differs between them applies without a restart."""
        return tuple(getattr(self, name) for name in PROCESS_FIELDS)


@dataclass(frozen=True)
class ModelSet:
    """The models a gateway serves: their specs; whether any model name is taken (one model chosen without names,
    or LLAMA_SERVER_URL, as one llama-server does); and the models file they came from (None: the environment)."""

    specs: Tuple[ModelSpec, ...]
    any_name: bool = False
    file: Optional[str] = None

    def named(self, name) -> Optional[ModelSpec]:
        """The spec a client's model name (an id or an alias) means, or None."""
        for spec in self.specs:
            if name in spec.names():
                return spec
        return None


def frozen_defaults(values: dict) -> Tuple[Tuple[str, str], ...]:
    """A dict of JSON-able request fields as ModelSpec.defaults holds them; ValueError naming a field that is not."""
    pairs = []
    for name, value in values.items():
        try:
            pairs.append((name, json.dumps(value, allow_nan=False, sort_keys=True)))
        except (TypeError, ValueError):
            # Never the value itself: a default may be a system prompt, which stays out of logs.
            raise ValueError(f"{name}: is not JSON (a date, a time, nan or inf)") from None
    return tuple(sorted(pairs))


# The fields that shape the llama.cpp process (its command line, its files): a change restarts it. The rest
# (names, upstreams, lifecycle, slots, request rules) is the gateway's own, applied live.
PROCESS_FIELDS = ("source", "args", "mmproj", "draft", "ctx", "parallel", "threads", "embeddings", "rerank")
LIVE_FIELDS = tuple(f.name for f in fields(ModelSpec) if f.name not in (*PROCESS_FIELDS, "id", "origin"))


class SpecDiff(NamedTuple):
    """Old specs against new ones, by id: each entry is the new spec (the old one for removed)."""

    added: Tuple[ModelSpec, ...]
    removed: Tuple[ModelSpec, ...]
    changed: Tuple[ModelSpec, ...]  # its process must restart (live changes come with it)
    live: Tuple[ModelSpec, ...]  # the same process; names, lifecycle or request rules changed
    unchanged: Tuple[ModelSpec, ...]


def diff(old_specs, new_specs) -> SpecDiff:
    """What a reload must do to go from old_specs to new_specs, each list in the order of its own file."""
    before = {spec.id: spec for spec in old_specs}
    after = {spec.id for spec in new_specs}
    kinds = {"added": [], "changed": [], "live": [], "unchanged": []}
    for spec in new_specs:
        old = before.get(spec.id)
        kind = ("added" if old is None else "changed" if old.identity() != spec.identity()
                else "live" if old != spec else "unchanged")
        kinds[kind].append(spec)
    removed = tuple(spec for spec in old_specs if spec.id not in after)
    return SpecDiff(removed=removed, **{kind: tuple(specs) for kind, specs in kinds.items()})
