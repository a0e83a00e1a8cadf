"""A model's request rules: defaults, an output ceiling and fields to strip, the same for every API family.

What a model's owner writes once (issue 21: `[models.x.defaults]`, `[models.x.limits]`) is applied to the body
of every request that model serves, before llama.cpp sees it:
- strip: top-level fields removed. A field both stripped and given a default is forced to the default (what
  llama-swap's setParams does).
- defaults: a field the client did not send (or sent as null) gets the default. The client's own value always
  wins; where both are JSON objects, the client's object gains the default's members it lacks (recursively),
  so `chat_template_kwargs = {enable_thinking = false}` survives a client that sends other template arguments.
  A default `max_tokens` means the output limit, in whatever field the endpoint names it (below), and applies
  only when the client sent no limit in any of them.
- max_tokens: a ceiling, never a refusal. A larger ask (or llama.cpp's "no limit", a negative n_predict) is
  lowered to it; a request that asks for no limit gets it, as llama-swap and LiteLLM users expect of a cap. It
  applies after the defaults (a default n_predict is capped like the client's own), and a limit that is no number
  is dropped, not set to it: llama.cpp skips such a field for the next one, which may be tighter.
Defaults and strip apply to every endpoint (llama.cpp ignores fields an endpoint does not read, as llama-swap's
filters do); the ceiling applies where the endpoint has an output limit. "model" and "stream" are the gateway's
own (routing, the shape of the answer): no rule may touch them.

The body is re-encoded only when a rule changed it; otherwise the client's bytes pass through as they came.
"""
import copy
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from ..errors import InvalidRequest


@dataclass(frozen=True)
class OutputLimit:
    """Where an endpoint's body says how many tokens to generate."""

    sets: str  # the field a ceiling, or a max_tokens default, sets when the client sent none
    # Every field llama.cpp may read as the limit, in the order it obeys them. A ceiling caps them all: any one
    # left above it would undo it.
    fields: tuple


# By llama-server path (relay.Endpoint.path). llama.cpp reads n_predict, else max_completion_tokens, else
# max_tokens; the Responses API's max_output_tokens becomes max_tokens. Its Anthropic converter (in the build
# read) passes max_tokens alone, but a build that passes the others must not open a way around the ceiling.
OUTPUT_LIMITS = {
    "/v1/chat/completions": OutputLimit("max_tokens", ("n_predict", "max_completion_tokens", "max_tokens")),
    "/v1/completions": OutputLimit("max_tokens", ("n_predict", "max_completion_tokens", "max_tokens")),
    "/v1/responses": OutputLimit("max_output_tokens",
                                 ("n_predict", "max_completion_tokens", "max_output_tokens", "max_tokens")),
    "/v1/messages": OutputLimit("max_tokens", ("max_tokens", "n_predict", "max_completion_tokens")),
    "/infill": OutputLimit("n_predict", ("n_predict", "max_completion_tokens", "max_tokens")),
}
LIMIT_DEFAULT = "max_tokens"  # the default that names the output limit, whatever the endpoint calls it
PROTECTED = ("model", "stream")
_ABSENT = object()


class RuleError(ValueError):
    """A rule that cannot be applied; where is its key in the model's table, ("limits", "strip")."""

    def __init__(self, where: tuple, message: str):
        super().__init__(f"{'.'.join(map(str, where))}: {message}")
        self.where, self.message = where, message


@dataclass(frozen=True)
class RequestRules:
    """One model's request rules; empty rules (the default) are false and cost a request nothing."""

    defaults: Mapping = field(default_factory=dict)  # field -> value, set when the client sent none
    max_tokens: int = None  # the output ceiling; None: none
    strip: tuple = ()  # top-level fields removed before llama.cpp sees the body

    def __post_init__(self):
        # Checked here, once, so that a bad models file fails at load (its reader places each RuleError at its
        # key's FILE:LINE), never a request.
        if not isinstance(self.defaults, Mapping):
            raise RuleError(("defaults",), "must be a table of request fields")
        if isinstance(self.strip, str):
            raise RuleError(("limits", "strip"), "must be a list of field names")
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "strip", tuple(self.strip))
        _check_limit(("limits", "max_tokens"), self.max_tokens)
        _check_limit(("defaults", LIMIT_DEFAULT), self.defaults.get(LIMIT_DEFAULT))
        # Each field a rule names, with where the models file says it (a default has a key, a strip an item).
        named = [(name, ("defaults", name)) for name in self.defaults]
        named += [(name, ("limits", "strip")) for name in self.strip]
        for name, where in named:
            if not isinstance(name, str) or name in PROTECTED:
                raise RuleError(where, f"{name!r} cannot be set or stripped (the gateway routes by 'model' and "
                                "answers as 'stream' asks)")
        try:
            json.dumps(dict(self.defaults), allow_nan=False)
        except (TypeError, ValueError) as error:
            raise RuleError(("defaults",), f"not a JSON value ({error})") from None

    def __bool__(self):
        """True when there is a rule to apply."""
        return bool(self.defaults or self.strip or self.max_tokens is not None)


def _check_limit(where, value):
    if value is not None and (type(value) is not int or value < 1):
        raise RuleError(where, f"must be a whole number of tokens, 1 or more (not {value!r})")


def apply(rules, raw: bytes, body: dict, path: str) -> tuple:
    """Apply a model's rules to a request for llama-server's path: (raw, body, lowered_from). The same raw and
    body objects come back when nothing changed; else the edited body, encoded anew. lowered_from is the
    client's limit that llama.cpp would have obeyed, where the ceiling lowered it (-1 and the like: its "no
    limit"), else None: the log line's note that a ceiling cut the request."""
    if not rules:
        return raw, body, None
    limit = OUTPUT_LIMITS.get(path)
    edited = dict(body)  # shallow: the client's values are shared, never changed in place
    changed = False
    for name in rules.strip:
        changed |= edited.pop(name, _ABSENT) is not _ABSENT
    for name, default in rules.defaults.items():
        if name != LIMIT_DEFAULT:  # the output limit has its own place, below (none where there is no limit)
            sent = edited.get(name)
            edited[name] = _with_default(sent, default)
            changed |= edited[name] is not sent
    lowered_from, ceiling = None, rules.max_tokens
    if ceiling is not None and limit is not None:
        # After the defaults: a default n_predict is capped like the client's own.
        obeyed = True  # the first valid limit present is the one llama.cpp would have obeyed
        for name in limit.fields:
            ask = edited.get(name)
            if ask is None:
                continue
            if type(ask) not in (int, float):
                # llama.cpp skips a limit that is no number for the next one: setting the ceiling there
                # would raise the limit it obeys. Dropped, the tightest valid one (or the ceiling, below) holds.
                del edited[name]
                changed = True
                continue
            if not 0 <= ask <= ceiling:
                edited[name], changed = ceiling, True
                if obeyed and type(ask) is int and ask is body.get(name):  # the client's, not a default
                    lowered_from = ask
            obeyed = False
    if limit is not None and all(edited.get(name) is None for name in limit.fields):
        wanted = [value for value in (rules.defaults.get(LIMIT_DEFAULT), ceiling) if value is not None]
        if wanted:
            edited[limit.sets], changed = min(wanted), True
    if not changed:
        return raw, body, None
    return encode(edited), edited, lowered_from


def _with_default(sent, default):
    """The client's value (the same object, where the default adds nothing to it); the default where it sent
    none (or null); where both are objects, the client's object with the default's members it lacks, merged the
    same way."""
    if sent is None:
        return copy.deepcopy(default)  # the rules' own objects never travel with a request
    if not (isinstance(sent, dict) and isinstance(default, dict)):
        return sent
    merged = dict(sent)
    for key, value in default.items():
        merged[key] = _with_default(sent.get(key), value)
    return merged if any(merged[key] is not sent.get(key) for key in default) else sent


def encode(body: dict) -> bytes:
    """The body as compact UTF-8 JSON, or a 400 where it holds what JSON cannot say."""
    try:
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (ValueError, RecursionError):
        # Python reads 1e999 as infinity, which no JSON can carry back.
        raise InvalidRequest("Request body holds a number too large for JSON (such as 1e999)") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate the client sent escaped (\ud800): UTF-8 cannot hold it, so it goes back escaped.
        return json.dumps(body, separators=(",", ":")).encode("ascii")
