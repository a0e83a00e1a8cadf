"""The models file: one TOML table per model, [models.NAME], read into ModelSpecs, with every problem reported at once
as FILE:LINE: models.NAME.KEY: what is wrong. It holds [models.*] tables only (the gateway's settings stay in .env).
Relative paths in source, mmproj and draft are from the models file's folder: the file means the same from anywhere.
"""
import difflib
import json
import math
import os
import re
from functools import partial

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..config import ConfigError
from ..converters import HUB_PREFIX, MODEL_NAME, hub_model, url
from ..proxy.request_rules import RequestRules, RuleError
from .spec import Limits, ModelSpec, Origin, frozen_defaults
from .toml_lines import PlacedProblems


class ModelsFileError(ConfigError):
    """A models file the gateway cannot use; problems holds every line found, FILE:LINE: models.NAME.KEY: what."""

    def __init__(self, problems):
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


_KINDS = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"), (list, "an array"),
          (dict, "a table"))


def _kind(value) -> str:
    return next((name for kind, name in _KINDS if isinstance(value, kind)), "a date or time")


def _typed(kind, words, fits=lambda value: True):
    # A check of one TOML value: its kind (a boolean is never a number here) and its range.
    def check(value, folder=None):
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind) or not fits(value):
            shown = repr(value) if isinstance(value, (bool, int, float, str)) else _kind(value)
            raise ValueError(f"must be {words}, not {shown}")
        return value
    return check


_string = _typed(str, "a string")
_flag = _typed(bool, "true or false")
_positive = _typed(int, "a whole number, 1 or more", lambda value: value >= 1)
_seconds = _typed((int, float), "a number of seconds, 0 or more (0: never unloaded)",
                  lambda value: 0 <= value < math.inf)


def _name(text) -> str:
    if not MODEL_NAME.fullmatch(text):
        raise ValueError(f"bad name {text!r}: 1-128 of A-Z a-z 0-9 . _ : / @ + -, starting with a letter or digit")
    return text


def _strings(value, folder=None, each=str, unique=False) -> tuple:
    if not isinstance(value, list):
        raise ValueError(f"must be an array of strings, not {_kind(value)}")
    for number, item in enumerate(value, start=1):
        if not isinstance(item, str):
            # ["--n-gpu-layers", 99] is the likely slip: args go to llama-server as text.
            raise ValueError(f"item {number} is {_kind(item)}, not a string (write it in quotes: \"{item}\")")
    items = tuple(each(item) for item in value)
    for number, item in enumerate(items, start=1):
        if unique and items.index(item) < number - 1:  # by number: a URL may hold a password
            raise ValueError(f"item {number} repeats item {items.index(item) + 1}")
    return items


def _model_file(value, folder) -> str:
    text = _string(value).strip()
    if not text:
        raise ValueError("is empty: name a .gguf file or an hf: spec")
    if text.startswith(HUB_PREFIX):
        hub_model(text)  # its form only: it is fetched when the model starts
        return text
    path = os.path.normpath(os.path.join(folder, os.path.expanduser(text)))
    if not os.path.isfile(path):
        where = "" if os.path.isabs(text) else " (relative to the models file)"
        raise ValueError(f"{'is a folder' if os.path.isdir(path) else 'no such file'}: {path}{where}")
    return path


def _projector(value, folder) -> str:
    return None if value == "none" else value if value == "auto" else _model_file(value, folder)


def _json(value, folder=None):
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        # Never the value itself: a default may be a system prompt, which stays out of logs.
        raise ValueError("is not JSON: a date, a time, nan or inf cannot reach llama.cpp") from None
    return value


# Each key a model table may hold: its check (value, models file folder) -> value, or a nested table's keys
# ("*": any key, as request fields are).
LIMIT_KEYS = {"max_tokens": _positive, "strip": _strings}
MODEL_KEYS = {"source": _model_file, "upstreams": partial(_strings, each=url, unique=True),
              "aliases": partial(_strings, each=_name, unique=True), "args": _strings,
              "mmproj": _projector, "draft": _model_file, "ctx": _positive, "parallel": _positive,
              "threads": _positive, "slots": _positive, "embeddings": _flag, "rerank": _flag, "ttl": _seconds,
              "pin": _flag, "preload": _flag, "defaults": {"*": _json}, "limits": LIMIT_KEYS}


def _table(table, keys, path, problems, folder) -> dict:
    checked = {}
    for key, value in table.items():
        check, where = keys.get(key, keys.get("*")), (*path, key)
        if check is None:
            close = difflib.get_close_matches(key, list(keys), n=1)
            problems.add(where, f"unknown key; did you mean {close[0]}?" if close else
                         f"unknown key; the keys are {', '.join(keys)}")
        elif isinstance(check, dict) and not isinstance(value, dict):
            problems.add(where, f"must be a table, not {_kind(value)}")
        elif isinstance(check, dict):
            checked[key] = _table(value, check, where, problems, folder)
        else:
            try:
                checked[key] = check(value, folder)
            except ValueError as error:
                problems.add(where, str(error))
    return checked


def _model(name, table, problems, folder, check_args):
    path = ("models", name)
    try:
        _name(name)
    except ValueError as error:
        problems.add(path, str(error))
    if not isinstance(table, dict):
        problems.add(path, f"must be a table, [models.{name}], not {_kind(table)}")
        return None
    checked = _table(table, MODEL_KEYS, path, problems, folder)
    if "source" not in table and not table.get("upstreams"):
        problems.add(path, "needs a source (a path or hf: spec) or upstreams (URLs of running llama-servers)")
    for key in ("mmproj", "draft"):
        if key in table and "source" not in table:
            problems.add((*path, key), "needs a source: llama-servers named in upstreams load their own")
    if checked.get("mmproj") == "auto" and not checked.get("source", HUB_PREFIX).startswith(HUB_PREFIX):
        problems.add((*path, "mmproj"), "\"auto\" takes the projector from the source's hf: repo; name its file")
    for message in check_args(checked["args"]) if check_args and "args" in checked else ():
        problems.add((*path, "args"), message)
    limits, defaults = Limits(**checked.pop("limits", {})), checked.pop("defaults", {})
    try:  # what routing builds from the spec: a rule it would refuse is placed here, at its line
        RequestRules(defaults, limits.max_tokens, limits.strip)
    except RuleError as error:
        problems.add((*path, *error.where), error.message)
    defaults = frozen_defaults(defaults)
    return ModelSpec(id=name, limits=limits, defaults=defaults, origin=Origin(problems.file, problems.lines.get(path)),
                     **checked)


def _check_names(specs, problems):
    ids, owners = {spec.id for spec in specs}, {}
    for spec in specs:
        for alias in spec.aliases:
            owner = "this model" if alias == spec.id else f"model {alias}" if alias in ids else owners.get(alias)
            if owner:
                problems.add(("models", spec.id, "aliases"), f"{alias} already names {owner}")
            owners.setdefault(alias, f"model {spec.id} (an alias there too)")


def parse_models(text, file, check_args=None) -> list:
    """The specs in a models file's text (file names it in messages); check_args(args) -> problems, if given."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        found = re.search(r"\s*\(at line (\d+), column (\d+)\)$", str(error))
        at = f"{found[1]}: " if found else f"{len(text.splitlines()) or 1}: "
        words = str(error)[:found.start()] + f" (column {found[2]})" if found else str(error)
        raise ModelsFileError([f"{file}:{at}{words}"]) from None
    problems, folder = PlacedProblems(file, text), os.path.dirname(os.path.abspath(file))
    for key in [key for key in data if key != "models"]:
        problems.add((key,), f"unknown top-level key: the file holds [models.NAME] tables only ([models.{key}]?)")
    models = data.get("models", {})
    if not isinstance(models, dict) or not models and not problems:  # else the top-level problem says it
        problems.add(("models",), "names no model: add a [models.NAME] table with a source or upstreams")
        models = {}
    specs = [_model(name, table, problems, folder, check_args) for name, table in models.items()]
    _check_names([spec for spec in specs if spec], problems)
    if problems:
        raise ModelsFileError(text for _, text in sorted(problems, key=lambda problem: problem[0]))  # by line
    return specs


def read_models_file(path, check_args=None) -> list:
    """Every model in the TOML models file at path, as ModelSpecs in file order; ModelsFileError with every
    problem found, or none at all."""
    file = os.fspath(path)
    try:
        with open(file, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ModelsFileError([f"{file}: cannot be read: {getattr(error, 'strerror', None) or error}"]) from None
    return parse_models(text, file, check_args)
