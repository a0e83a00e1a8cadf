"""Models from Hugging Face by name: hf:OWNER/REPO[:QUANT] picks the repo's GGUF for a quant (every part of a
split one), hf:OWNER/REPO/FILE.gguf names one file.

huggingface_hub fetches them into MODELS_DIR (it reads HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE, resumes a cut
transfer with a Range request, locks each file, and keeps a download in progress in
MODELS_DIR/.cache/huggingface/download/ until it is whole). A record of the files each name picked,
MODELS_DIR/.cache/llama-gateway/hf/OWNER/REPO/QUANT.json, lets a later start find them with no network call.
"""
import errno
import glob
import json
import logging
import os
import re
import shutil
import sys
import time
from urllib.parse import quote

import httpx2
from huggingface_hub import HfApi, constants, get_token, hf_hub_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RemoteEntryNotFoundError, RepositoryNotFoundError)
from ..converters import HUB_PREFIX, hub_model, public_url
from .errors import LlamaStartError
from .hub_progress import progress_class, size_text, wants_bar
from .names import PROJECTOR_NAME, SPLIT_PART, model_name

log = logging.getLogger(__name__)

DEFAULT_QUANT = "Q4_K_M"  # llama-server's own default for -hf
RECORDS = (".cache", "llama-gateway", "hf")  # under MODELS_DIR: the files each hf: name picked
DOWNLOADS = (".cache", "huggingface", "download")  # huggingface_hub's metadata and *.incomplete, under MODELS_DIR
# A *.incomplete untouched this long belongs to a fetch that died (killed): huggingface_hub never resumes those
# (each download writes a file of its own), and its reads time out after 10 s, so a live one is never this stale.
STALE_PARTIAL_S = 600
# The quant tag a GGUF's name ends with, to list what a repo has: Q4_K_M, IQ2_XXS, UD-Q4_K_XL, Q8_0, BF16, ...
QUANT_TAG = re.compile(r"(?:^|[-._])((?:UD-)?(?:I?Q\d+(?:_[A-Z0-9]+)*|TQ\d_\d|B?F16|F32|MXFP4(?:_MOE)?))$", re.I)


class HubError(LlamaStartError):
    """A model named hf: could not be had; the message is one line that says what to do."""


def fetch(spec: str, models_dir: str, *, refresh: bool = False, bar: bool = None) -> str:
    """The path of the model an hf: name picks (a split model's first part): the copy kept in models_dir, with no
    network call, else (or with refresh, unless offline) fetched from the Hub. bar: a progress bar rather than
    log lines (default: when stderr is a terminal and the logs are text). Raises HubError."""
    try:
        repo, quant, file = hub_model(spec)
    except ValueError as error:
        raise HubError(f"{spec}: {error}") from None
    models_dir = os.path.abspath(models_dir)
    _quiet_hub()
    kept = kept_copy(models_dir, spec)
    if kept and (not refresh or constants.is_offline_mode()):
        log.info("model kept", extra={"fields": {"model": spec, "path": kept}})
        return kept
    try:
        return _download(spec, models_dir, repo, quant, file, wants_bar() if bar is None else bar)
    except (OSError, httpx2.TransportError) as error:  # huggingface_hub's HTTP errors are OSErrors too
        if kept and _unreachable(error):
            log.warning("hub unreachable: serving the kept copy", extra={"fields": {"model": spec, "path": kept}})
            return kept
        raise HubError(_explain(error, spec, repo, models_dir)) from None
    except ValueError as error:  # a repo id or a file name the Hub's client refuses (HFValidationError and kin)
        raise HubError(f"{spec}: {_without_credentials(str(error).splitlines()[0])}") from None


def pick(filenames, repo: str, quant: str = None, file: str = None) -> list:
    """The files an hf: name picks among a repo's: FILE (with its other parts, when split), or the model whose
    name carries QUANT (case-insensitive; default Q4_K_M, or the repo's only model). Raises HubError naming what
    the repo has."""
    models = _models(filenames)
    if file:
        for files in models.values():
            if file in files:
                return files
        raise HubError(f"hf:{repo} has no GGUF file {file}; its GGUF files: {', '.join(models) or 'none'}")
    wanted = quant or DEFAULT_QUANT
    tag = re.compile(rf"(?:^|[-._]){re.escape(wanted)}(?:$|[-.])", re.IGNORECASE)
    matching = [files for first, files in models.items() if tag.search(model_name(first))]
    if not matching and not quant and len(models) == 1:
        matching = list(models.values())  # a repo of one model: that one, whatever its quant
    if len(matching) == 1:
        return matching[0]
    if matching:
        raise HubError(f"hf:{repo} has several GGUF files for {wanted}: {', '.join(files[0] for files in matching)}; "
                       f"name one as hf:{repo}/FILE.gguf")
    if not models:
        raise HubError(f"hf:{repo} holds no GGUF model: name a repo of GGUF files (their names often end in -GGUF)")
    quants = list(dict.fromkeys(_quant_of(first) for first in models))
    raise HubError(f"hf:{repo} has no GGUF file for {wanted}; its quants: {', '.join(quants)} "
                   f"(name one as hf:{repo}:{quants[0]})")


def kept_copy(models_dir: str, spec: str):
    """The path of the kept copy of an hf: name in models_dir (a split model's first part), or None when none is
    recorded or a file of it is gone."""
    try:
        with open(_record_path(models_dir, *hub_model(spec)), encoding="utf-8") as record:
            paths = [_local_path(models_dir, name) for name in json.load(record)["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return paths[0] if paths and all(os.path.isfile(path) for path in paths) else None


def _models(filenames) -> dict:
    """A repo's GGUF models, {first file: [its files]}: a split model's parts in order, and only when all are
    listed; multimodal projectors (mmproj) are no model of their own."""
    groups = {}
    for name in sorted(filenames):
        if not _safe_name(name):
            continue  # a listing (a mirror's) that names a file outside the repo: never picked, never claimed
        base = name.rsplit("/", 1)[-1]
        if base.lower().endswith(".gguf") and not PROJECTOR_NAME.search(base):
            split = SPLIT_PART.search(name)
            groups.setdefault(name[:split.start()] if split else name, []).append(name)
    models = {}
    for files in groups.values():
        split = SPLIT_PART.search(files[0])
        numbers = [int(SPLIT_PART.search(name)[1]) for name in files] if split else None
        if not split or numbers == list(range(1, int(split[2]) + 1)):
            models[files[0]] = files
    return models


def _safe_name(name) -> bool:
    """A repo file name that stays inside the folder it is kept in, on every system: Windows also reads a
    backslash as a separator and C:NAME as a path on drive C."""
    if not isinstance(name, str):  # a record's entry may be anything
        return False
    parts = name.split("/")
    return "\\" not in name and ":" not in name and ".." not in parts and "" not in parts


def _quant_of(filename: str) -> str:
    """The quant tag a GGUF's name ends with (Q4_K_M), else its whole name."""
    tag = QUANT_TAG.search(model_name(filename))
    return tag[1] if tag else filename


def _download(spec, models_dir, repo, quant, file, bar) -> str:
    """List the repo, pick its files, fetch each one the kept copy lacks, record them; return the first."""
    endpoint = _endpoint()
    info = HfApi(endpoint=endpoint).model_info(repo, revision="main", files_metadata=True)
    sizes = {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or ()}
    files = pick(sizes, repo, quant, file)
    _claim(models_dir, repo, files)
    _check_space(spec, models_dir, sum(sizes[name] for name in files
                                       if not os.path.isfile(_local_path(models_dir, name))))
    _sweep_stale_partials(models_dir)
    log.info("fetching model", extra={"fields": {"model": spec, "commit": info.sha, "files": files,
                                                 "bytes": sum(sizes[name] for name in files), "into": models_dir}})
    for number, name in enumerate(files, 1):
        # The commit, not "main": every part from one commit, and a file already fetched at it needs no request.
        hf_hub_download(repo, name, revision=info.sha, local_dir=models_dir, endpoint=endpoint,
                        tqdm_class=progress_class(name, f"{number}/{len(files)}", bar))
    record = {"repo": repo, "commit": info.sha, "files": files}
    _record(models_dir, _record_path(models_dir, repo, quant, file), record)
    path = _local_path(models_dir, files[0])
    log.info("model fetched", extra={"fields": {"model": spec, "path": path}})
    return path


def _claim(models_dir, repo, files):
    """Refuse a fetch that would replace a file of models_dir from elsewhere: one put there by hand, or one
    fetched from another repo (huggingface_hub replaces a file whose content differs)."""
    owners = {}
    for record in glob.glob(os.path.join(models_dir, *RECORDS, "*", "*", "*.json")):
        try:
            with open(record, encoding="utf-8") as opened:
                content = json.load(opened)
            owners.update(dict.fromkeys(content["files"], content["repo"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record being written, or broken: it claims nothing
    for name in files:
        path = _local_path(models_dir, name)
        owner = owners.get(name)
        fetched = os.path.isfile(_local_path(os.path.join(models_dir, *DOWNLOADS), name) + ".metadata")
        if os.path.exists(path) and not owner and not fetched:
            raise HubError(f"{path} is there already and was not fetched from {repo}: move it away, or serve it "
                           f"by its path (LLAMA_MODEL={path})")
        if os.path.exists(path) and owner and owner.lower() != repo.lower():
            raise HubError(f"{path} was fetched from {owner}, and {repo} has a file of the same name: set MODELS_DIR "
                           "to another folder for one of them")


def _check_space(spec, models_dir, needed: int):
    """Fail before a byte is written when the disk cannot hold the files (huggingface_hub only warns)."""
    os.makedirs(models_dir, exist_ok=True)
    free = shutil.disk_usage(models_dir).free
    if needed > free:
        raise HubError(f"{spec}: the disk is full: {size_text(needed)} needed in {models_dir}, {size_text(free)} "
                       "free; free some space, or set MODELS_DIR to a folder on a larger disk")


def _sweep_stale_partials(models_dir):
    """Delete what killed fetches left in huggingface_hub's download folder."""
    stale = time.time() - STALE_PARTIAL_S
    for partial in glob.glob(os.path.join(models_dir, *DOWNLOADS, "**", "*.incomplete"), recursive=True):
        try:
            if os.path.getmtime(partial) < stale:
                os.remove(partial)
        except OSError:
            continue  # gone already, or held open by its (live) writer on Windows


def _record(models_dir, path, content):
    """Write the record (at path, under models_dir) of the files an hf: name picked, atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ignore = os.path.join(models_dir, *RECORDS[:2], ".gitignore")
    if not os.path.exists(ignore):  # as huggingface_hub does for its own folder: models/ may be in a git checkout
        with open(ignore, "w", encoding="utf-8") as out:
            out.write("*\n")
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "w", encoding="utf-8") as out:
        json.dump(content, out)
    os.replace(partial, path)


def _record_path(models_dir, repo, quant, file) -> str:
    owner, name = repo.lower().split("/")  # repo names are case-insensitive on the Hub
    key = f"_file-{quote(file, safe='')}" if file else (quant.upper() if quant else "_default")
    return os.path.join(models_dir, *RECORDS, owner, name, f"{key}.json")


def _local_path(folder, name) -> str:
    """Where a repo file is kept in folder; ValueError for a name that would leave it (a record's entries are
    checked here too: one edited, or written by a mirror's listing, is no path to follow)."""
    if not _safe_name(name):
        raise ValueError(f"not a file name inside the repo: {name!r}")
    return os.path.join(folder, *name.split("/"))


def _endpoint() -> str:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once, at import), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _quiet_hub():
    """No telemetry (it would also fetch a list of agents from the Hub); huggingface_hub's log records go through
    the gateway's own handler only (JSON or text), not a second one of its own; no line per HTTP request."""
    constants.HF_HUB_DISABLE_TELEMETRY = True
    logging.getLogger("huggingface_hub").handlers.clear()
    for name in ("huggingface_hub", "httpx2"):  # their messages quote URLs: a mirror's user:password never shown
        if not any(isinstance(each, _HideCredentials) for each in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_HideCredentials())
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request; DEBUG shows them


_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def _without_credentials(text: str) -> str:
    """text with any user:password@ of a URL in it taken out."""
    return _CREDENTIALS.sub("", text)


class _HideCredentials(logging.Filter):
    """Takes user:password@ out of the URLs in a log record's message."""

    def filter(self, record):
        """Rewrite the record's message without credentials; keep the record."""
        message = record.getMessage()
        if "@" in message:
            record.msg, record.args = _without_credentials(message), None
        return True


def _unreachable(error) -> bool:
    """True when the Hub could not be asked (no network, offline mode) or could not answer (5xx)."""
    if isinstance(error, (httpx2.TransportError, OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return True
    return isinstance(error, HfHubHTTPError) and error.response is not None and error.response.status_code >= 500


def _explain(error, spec, repo, models_dir) -> str:
    """One line for a failed fetch: what went wrong and what to do (never the token)."""
    host, token = public_url(_endpoint()), get_token()
    status = error.response.status_code if isinstance(error, HfHubHTTPError) and error.response is not None else None
    read = "check that HF_TOKEN may read it" if token else "set HF_TOKEN to a token that may read it"
    if isinstance(error, GatedRepoError) and token:
        return f"{spec}: {repo} is gated and HF_TOKEN's account may not read it yet: accept its terms at {host}/{repo}"
    if isinstance(error, GatedRepoError):
        return f"{spec}: {repo} is gated: accept its terms at {host}/{repo}, then set HF_TOKEN to a read token " \
               "of that account"
    if isinstance(error, RepositoryNotFoundError):
        return f"{spec}: no repo {repo} on {host}, or it is private: check the name, or {read}"
    if isinstance(error, RemoteEntryNotFoundError):
        return f"{spec}: {repo} has no such file on {host}"
    if status in (401, 403):
        return f"{spec}: {host} refused access ({status}): {read}"
    if status:
        return f"{spec}: {host} answered {status}: try again later"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"{spec}: the disk is full: free some space in {models_dir}, or set MODELS_DIR to a folder on a " \
               "larger disk"
    if constants.is_offline_mode():
        return f"{spec}: HF_HUB_OFFLINE is set and no copy is kept in {models_dir}: unset it to fetch the model, or " \
               "fetch it with bin/pull first"
    if _unreachable(error):
        return f"{spec}: cannot reach {host}, and no copy is kept in {models_dir}: connect to the network (or set " \
               "HF_ENDPOINT to a mirror), or copy the model there"
    return f"{spec}: cannot keep it in {models_dir}: {error.strerror or error}"


def main(argv=None) -> int:
    """bin/pull: fetch models named hf:OWNER/REPO[:QUANT] into MODELS_DIR without serving them; print each path."""
    import argparse

    from dotenv import load_dotenv

    from ..config import ConfigError, exit_on_config_error, load_settings
    from ..operations.logs import configure_logging
    from ..paths import MODELS_DIR, PROJECT_ROOT

    parser = argparse.ArgumentParser(prog="bin/pull", description="Fetch GGUF models from Hugging Face into "
                                     "MODELS_DIR (default models/), where bin/serve finds them with no network.")
    parser.add_argument("models", nargs="+", metavar="hf:OWNER/REPO[:QUANT]",
                        help="a repo and quant (default Q4_K_M), or hf:OWNER/REPO/FILE.gguf")
    models = parser.parse_args(argv).models
    load_dotenv(os.path.join(PROJECT_ROOT, ".env"), override=False)
    try:
        settings = load_settings(os.environ)
    except ConfigError as error:
        exit_on_config_error(error)
    configure_logging(settings["LOG_LEVEL"], settings["LOG_FORMAT"])
    try:
        for spec in models:
            spec = spec if spec.startswith(HUB_PREFIX) else HUB_PREFIX + spec
            print(fetch(spec, settings["MODELS_DIR"] or MODELS_DIR, refresh=True), flush=True)
    except HubError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; files fetched whole are kept: run it again for the rest", file=sys.stderr)
        return 130
    return 0
