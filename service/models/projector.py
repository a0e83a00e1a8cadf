"""Multimodal projectors (llama.cpp's --mmproj files), the encoders that let a model see images or hear audio:
which GGUF is one, which one a Hugging Face repo offers a model named hf:, and fetching it beside the model.

Which one "auto" takes: among the repo's GGUFs with mmproj in their names (as llama-server -hf tells them), those
in the model's folder or one above it, the nearest first (as llama-server does); then F16, else BF16, else F32,
else the first by name. llama-server takes the precision nearest the model's quant instead (Q8_0 for a Q4_K_M); F16
is what converters write and ggml-org ships, it reads images best, and one choice for every quant of a repo means
one download for all of them.

A projector is kept in MODELS_DIR/mmproj-OWNER--REPO/ under its name in the repo (huggingface_hub's local_dir, so
a cut transfer resumes and a file is never fetched twice): projectors of different repos share names
(mmproj-F16.gguf, mmproj-model-f16.gguf), a folder per repo keeps them apart, and model_files() never lists it. A
record beside the model's, MODELS_DIR/.cache/llama-gateway/hf/OWNER/REPO/_mmproj-*.json, says which file a name
and a choice picked, or that the repo has none, so that a later start needs no network call.
"""
import json
import logging
import os
import struct
from dataclasses import dataclass
from typing import Optional
from urllib.parse import quote

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download

from ..converters import HUB_PREFIX, hub_model
from . import hub
from .hub import HubError
from .hub_progress import progress_class, wants_bar
from .model_file import GGUF_MAGIC
from .names import PROJECTOR_NAME, model_name

log = logging.getLogger(__name__)

PRECISIONS = ("F16", "BF16", "F32")  # a projector's precision, the preferred first
FOLDER = "mmproj-{owner}--{name}"  # under MODELS_DIR: a repo's projectors ("--" is in no repo id's part)
# general.architecture of a projector (vision and audio alike: llama.cpp's clip.cpp reads both).
PROJECTOR_ARCHITECTURE = "clip"
# Writers put general.architecture first; a header that does not have it this early is not read further.
HEADER_BYTES, HEADER_KEYS = 65536, 64
# GGUF value types: the size of each fixed one; 8 is a string, 9 an array.
FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class _Wanted:
    """What a choice asks of a repo: the record key its answer is kept under, and how failures name it."""

    repo: str
    key: str
    label: str
    model: tuple = None  # auto: the model's (quant, file), whose folder the projector is looked for from
    file: str = None  # a projector named by its file in the repo
    tag: str = None  # hf:OWNER/REPO:TAG: the projector of that precision


def fetch_projector(spec: str, models_dir: str, choice: str = "auto", *, refresh: bool = False,
                    bar: bool = None) -> Optional[str]:
    """The path of the projector for the model an hf: name picks, kept in models_dir: choice "auto" (the model's
    repo's own, None when it has none), a file name in that repo, or hf:OWNER/REPO[:TAG] or hf:OWNER/REPO/FILE.gguf;
    None or "none": no projector. A kept copy (or a repo known to have none) needs no network call; else (or with
    refresh, unless offline) the repo is asked. bar as in hub.fetch. Raises HubError."""
    if choice in (None, "none") or (choice == "auto" and not spec.startswith(HUB_PREFIX)):
        return None  # a local model: no repo to take a projector from
    wanted = _wanted(spec, choice)
    models_dir = os.path.abspath(models_dir)
    hub._quiet_hub()
    record = os.path.join(models_dir, *hub.RECORDS, *wanted.repo.lower().split("/"), f"{wanted.key}.json")
    known, kept = _kept(models_dir, record)
    if known and (not refresh or constants.is_offline_mode()):
        log.info("projector kept", extra={"fields": {"model": wanted.label, "path": kept}})
        return kept
    try:
        return _download(wanted, models_dir, record, wants_bar() if bar is None else bar)
    except (OSError, httpx2.TransportError) as error:  # huggingface_hub's HTTP errors are OSErrors too
        if known and hub._unreachable(error):
            log.warning("hub unreachable: serving the kept projector", extra={"fields": {"model": wanted.label,
                                                                                         "path": kept}})
            return kept
        raise HubError(hub._explain(error, wanted.label, wanted.repo, models_dir)) from None
    except ValueError as error:  # a repo id or a file name the Hub's client refuses
        raise HubError(f"{wanted.label}: {hub._without_credentials(str(error).splitlines()[0])}") from None


def pick_projector(filenames, model_file: str = None, tag: str = None) -> Optional[str]:
    """The projector for a model among a repo's files (see the module's note), None when there is none; model_file:
    the model's first file (None: one at the repo's top); tag: only a projector of that precision (F16, Q8_0)."""
    folder = model_file.split("/")[:-1] if model_file else []

    def rank(name):
        depth = name.count("/")
        precision = _precision(name)
        return -depth, PRECISIONS.index(precision) if precision in PRECISIONS else len(PRECISIONS), name

    nearby = [name for name in projectors(filenames) if name.split("/")[:-1] == folder[:name.count("/")]
              and (tag is None or _precision(name) == tag.upper())]
    return min(nearby, key=rank, default=None)


def projectors(filenames) -> list:
    """The projectors among a repo's files, by name."""
    return sorted(name for name in filenames if hub._safe_name(name) and name.lower().endswith(".gguf")
                  and PROJECTOR_NAME.search(name.rsplit("/", 1)[-1]))


def is_projector(path: str) -> bool:
    """True for a local GGUF that is a projector rather than a model: by its name, else by its header."""
    return bool(PROJECTOR_NAME.search(os.path.basename(path))) or gguf_architecture(path) == PROJECTOR_ARCHITECTURE


def gguf_architecture(path: str) -> Optional[str]:
    """general.architecture of a GGUF (llama, gemma3, clip, ...) from its first bytes alone; None when the file is
    no GGUF, cannot be read, or does not say it early."""
    try:
        with open(path, "rb") as file:
            head = file.read(HEADER_BYTES)
    except OSError:
        return None
    try:
        version, _tensors, keys = struct.unpack_from("<IQQ", head, len(GGUF_MAGIC))
        if head[:len(GGUF_MAGIC)] != GGUF_MAGIC or version not in (2, 3):  # 1: 32-bit lengths; big-endian: >3
            return None
        offset = len(GGUF_MAGIC) + 20
        for _ in range(min(keys, HEADER_KEYS)):
            key, offset = _string(head, offset)
            (kind,), offset = struct.unpack_from("<I", head, offset), offset + 4
            if key == "general.architecture":
                return _string(head, offset)[0] if kind == STRING else None
            offset = _skip(head, offset, kind)
    except (struct.error, ValueError, UnicodeDecodeError):  # a header cut short by HEADER_BYTES, or broken
        return None
    return None


def _string(head: bytes, offset: int) -> tuple:
    (size,) = struct.unpack_from("<Q", head, offset)
    end = offset + 8 + size
    if end > len(head):
        raise ValueError("past the bytes read")
    return head[offset + 8:end].decode("utf-8"), end


def _skip(head: bytes, offset: int, kind: int) -> int:
    if kind in FIXED_SIZES:
        return offset + FIXED_SIZES[kind]
    if kind == STRING:
        return _string(head, offset)[1]
    if kind != ARRAY:
        raise ValueError(f"unknown value type {kind}")
    item, count = struct.unpack_from("<IQ", head, offset)
    offset += 12
    if item in FIXED_SIZES:
        return offset + FIXED_SIZES[item] * count
    for _ in range(count):  # strings or arrays: bounded by the bytes read, _string raises past them
        offset = _skip(head, offset, item)
    return offset


def _precision(name: str) -> Optional[str]:
    tag = hub.QUANT_TAG.search(model_name(name))
    return tag[1].upper() if tag else None


def _parse(spec: str) -> tuple:
    try:
        return hub_model(spec)
    except ValueError as error:
        raise HubError(f"{spec}: {error}") from None


def _wanted(spec: str, choice: str) -> _Wanted:
    """What choice asks for, for the model spec names: a repo, and a file, a tag or the model's folder in it."""
    if choice.startswith(HUB_PREFIX):
        repo, tag, file = _parse(choice)
        key = f"_mmproj-file-{quote(file, safe='')}" if file else f"_mmproj-{tag.upper()}" if tag else "_mmproj-best"
        return _Wanted(repo, key, choice, file=file, tag=tag)
    if not spec.startswith(HUB_PREFIX):
        raise HubError(f"{spec}: a projector named {choice} is looked for in the model's hf: repo, and {spec} is "
                       "a local file: name the projector by its path, or as hf:OWNER/REPO/FILE.gguf")
    repo, quant, file = _parse(spec)
    if choice == "auto":
        model_key = os.path.basename(hub._record_path("", repo, quant, file))[:-len(".json")]
        return _Wanted(repo, f"_mmproj-for-{model_key}", f"{spec} (its projector)", model=(quant, file))
    try:
        hub_model(f"{HUB_PREFIX}{repo}/{choice}")  # a file name's form: a .gguf, inside the repo
    except ValueError:
        raise HubError(f"{spec}: mmproj must be auto, none, a path, hf:OWNER/REPO/FILE.gguf or the name of a .gguf "
                       f"file in {repo}, not {choice!r}") from None
    return _Wanted(repo, f"_mmproj-file-{quote(choice, safe='')}", f"{spec} (projector {choice})", file=choice)


def _kept(models_dir: str, record: str) -> tuple:
    """(known, path): the kept projector a record names (path None: the repo has none); known is False when there
    is no record, or a file it names is gone."""
    try:
        with open(record, encoding="utf-8") as opened:
            names = json.load(opened)["files"]
        paths = [hub._local_path(models_dir, name) for name in names]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False, None
    if not all(os.path.isfile(path) for path in paths):
        return False, None
    return True, (paths[0] if paths else None)


def _download(wanted: _Wanted, models_dir: str, record: str, bar: bool) -> Optional[str]:
    """List the repo, pick the projector, fetch it unless kept, record the pick (or that there is none)."""
    endpoint = hub._endpoint()
    info = HfApi(endpoint=endpoint).model_info(wanted.repo, revision="main", files_metadata=True)
    sizes = {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or ()}
    name = _choose(sizes, wanted)
    if name is None:
        hub._record(models_dir, record, {"repo": wanted.repo, "commit": info.sha, "files": []})
        log.info("no projector", extra={"fields": {"model": wanted.label, "commit": info.sha}})
        return None
    # The Hub's own spelling of the repo (its case) names the folder, but only when it is the repo asked for: a
    # mirror's id is never trusted with a path (a backslash in it would leave MODELS_DIR on Windows).
    owner, repo_name = (info.id if (info.id or "").lower() == wanted.repo.lower() else wanted.repo).split("/")
    folder = FOLDER.format(owner=owner, name=repo_name)
    local_dir = os.path.join(models_dir, folder)
    path = hub._local_path(local_dir, name)
    if os.path.exists(path) and not os.path.isfile(hub._local_path(os.path.join(local_dir, *hub.DOWNLOADS),
                                                                    name) + ".metadata"):
        raise HubError(f"{path} is there already and was not fetched from {wanted.repo}: move it away")
    hub._check_space(wanted.label, models_dir, 0 if os.path.isfile(path) else sizes[name])
    hub._sweep_stale_partials(local_dir)
    log.info("fetching projector", extra={"fields": {"model": wanted.label, "commit": info.sha, "file": name,
                                                     "bytes": sizes[name], "into": local_dir}})
    hf_hub_download(wanted.repo, name, revision=info.sha, local_dir=local_dir, endpoint=endpoint,
                    tqdm_class=progress_class(name, "1/1", bar))
    hub._record(models_dir, record, {"repo": wanted.repo, "commit": info.sha, "files": [f"{folder}/{name}"]})
    log.info("projector fetched", extra={"fields": {"model": wanted.label, "path": path}})
    return path


def _choose(filenames, wanted: _Wanted) -> Optional[str]:
    """The repo file wanted names; HubError, naming the projectors there, when one was asked for and is not."""
    there = ", ".join(projectors(filenames)) or "none"
    if wanted.file:
        for name in sorted(filenames, key=lambda name: name != wanted.file):  # the exact name, else any case
            if name.lower() == wanted.file.lower() and hub._safe_name(name):
                return name
        raise HubError(f"hf:{wanted.repo} has no file {wanted.file}; its projectors: {there}")
    model_file = hub.pick(filenames, wanted.repo, *wanted.model)[0] if wanted.model else None
    name = pick_projector(filenames, model_file, wanted.tag)
    if name is None and not wanted.model:  # named hf:OWNER/REPO[:TAG]: one was asked for
        raise HubError(f"hf:{wanted.repo} has no projector{f' for {wanted.tag}' if wanted.tag else ''} at its top; "
                       f"its projectors: {there}")
    return name
