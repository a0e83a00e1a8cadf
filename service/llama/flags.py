"""llama-server's flags as data: each flag (its spellings) and the xllamacpp CommonParams fields it sets.

A llama-server binary takes a model's flags verbatim; the xllamacpp child builds its CommonParams from this table
(`apply`). The gateway checks flags (`problems`, `owned`) and shows them (`command_line`) without importing
xllamacpp: values here are plain data, and xllamacpp's enum members and classes are looked up by name (`Native`)
only when applied (their readers: flag_values.py). Semantics follow llama.cpp's common/arg.cpp; a flag missing
here is one line in FLAGS.
"""
import difflib
import functools
import os
import re
import shlex
import subprocess
from typing import Any, Callable, NamedTuple, Optional

from .flag_values import (LORA, Bit, Native, Padded, choice, comma_list, context_size, file_text, integer,
                          made_directory, lora_scaled, member, number, parser, rope_scale, template_kwargs, tensor_overrides)


class FlagError(ValueError):
    """One problem with one flag: the message names the flag as it was written."""

    def __init__(self, flag: str, message: str, *, any_build: bool = False):
        super().__init__(message)
        self.flag = flag
        self.any_build = any_build  # every llama.cpp refuses it, a binary newer than the table too


SAME = object()  # in Flag.weak: the flag's own value


class Flag(NamedTuple):
    """One llama-server flag: its spellings and how its value reaches CommonParams."""
    names: tuple  # the first is the one messages and lists use
    fields: tuple  # dotted CommonParams paths; with several, parse returns one value per field (None: leave it)
    parse: Optional[Callable] = None  # text -> value; None: a switch, which takes no value
    negs: tuple = ()  # spellings that turn a switch off
    on: Any = True  # a switch's value(s) ...
    off: Any = False  # ... and when turned off
    merge: Any = False  # True: repeats add up (lists, sets, dicts, comma-joined overrides); a function (the value
    # so far or None, this one) -> value: it combines them; False: the last one wins
    weak: tuple = ()  # (field, value or SAME) also set, unless another flag sets that field
    needs: str = ""  # a field that must end up true, else the flag is ignored (as the child always did)
    owner: str = ""  # why the gateway sets this flag itself; empty: a user's args may set it
    key: str = ""  # the models file's key that sets it instead (an owned flag); empty: none, the gateway alone
    secret: bool = False  # its value never shows in a message or a printed command line


_TRUE, _FALSE = ("on", "enabled", "true", "1"), ("off", "disabled", "false", "0")  # llama.cpp's truthy, falsey
_FLASH = {word: "LLAMA_FLASH_ATTN_TYPE_" + ("ENABLED" if word in _TRUE else "DISABLED" if word in _FALSE else "AUTO")
          for word in _TRUE + _FALSE + ("auto", "-1")}
_THINK = {**dict.fromkeys(_TRUE, (1, {"enable_thinking": "true"})), "auto": (-1, None), "-1": (-1, None),
          **dict.fromkeys(_FALSE, (0, {"enable_thinking": "false"}))}  # the chat template is told too
_KV_TYPE = member("ggml_type", "GGML_TYPE_", "f32 f16 bf16 q8_0 q4_0 q4_1 iq4_nl q5_0 q5_1")  # kv_cache_types
_LOAD = "llama_load_mode.LLAMA_LOAD_MODE_"
# --mmap/--no-mmap and --mlock each set one half of the load mode and keep the other (llama.cpp's use_mmap and
# use_mlock before they became one enum): --mlock alone is mmap+mlock, with --no-mmap it is mlock.
_LOAD_HALVES = {Native(_LOAD + name): halves for name, halves in (
    ("NONE", (False, False)), ("MMAP", (True, False)), ("MLOCK", (False, True)), ("MMAP_MLOCK", (True, True)))}
_LOAD_MODES = {halves: mode for mode, halves in _LOAD_HALVES.items()}


def _load_half(so_far, half):
    """The load mode after a flag that sets one half of it (the other None): from llama.cpp's default (mmap) when
    nothing set it yet, or a mode with no halves (dio, auto) did."""
    return _LOAD_MODES[tuple(mine if mine is not None else kept
                             for mine, kept in zip(half, _LOAD_HALVES.get(so_far, (True, False))))]


_SPEC = member("common_speculative_type", "COMMON_SPECULATIVE_TYPE_", "none draft-simple draft-eagle3 draft-mtp "
               "draft-dflash draft-dspark ngram-simple ngram-map-k ngram-map-k4v ngram-mod ngram-cache")
_DRAFT_SIMPLE = [Native("common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE")]
# llama.cpp's pattern for the expert weights of a mixture-of-experts layer (common.h, LLM_FFN_EXPS_REGEX)
_EXPERTS = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
_path = parser("FILE", str)
_LAYERS = parser("N|auto|all", lambda text: {"auto": -1, "all": -2}.get(text) or integer()(text))  # -1: fit them
_THREADS = parser("N", lambda text: max(integer()(text), 0) or os.cpu_count() or 1)  # 0 or less: one per core


def _row(names, fields, parse=None, negs="", **options):
    """A table row: spellings and fields as space-separated words."""
    return Flag(tuple(names.split()), tuple(fields.split()), parse, tuple(negs.split()), **options)


# llama.cpp marks these as the user's (common_params_sampling_config bits): a GGUF's general.sampling.* yields to them
_USER_SET = {"top_k": 2, "top_p": 4, "min_p": 8, "temp": 64, "penalty_last_n": 128, "penalty_repeat": 256}


def _sampling(names, fields, parse=number):
    """A row of llama-server's sampling defaults, fields under sampling., marked as the user's as llama.cpp does."""
    fields = ["sampling." + field for field in fields.split()]
    bit = Bit(_USER_SET.get(fields[0].split(".")[1], 0)) or None  # None: the mark is left alone

    def convert(text):
        value = parse(text)
        return (*(value if len(fields) > 1 else (value,)), bit)
    return _row(names, " ".join(fields + ["sampling.user_sampling_config"]), parser(parse.hint, convert), merge=True)


FLAGS = (
    # Set by the gateway for every model: a user's args that set them would cut the gateway off its model, or
    # contradict a key of the models file that the gateway itself acts on (memory budget, routes, fetched files).
    _row("--model -m", "model.path", _path, owner="it passes the model", key="source"),
    _row("--host", "hostnames", parser("HOST", lambda text: [text]), owner="it picks the address"),
    _row("--port", "port", integer(0, 65535), owner="it picks the port"),
    _row("--alias -a", "model_alias", parser("NAME,...", lambda text: set(comma_list(text))), merge=True,
         owner="it names the model", key="aliases"),
    _row("--metrics", "endpoint_metrics", owner="it reads llama.cpp's /metrics"),
    _row("--api-key", "api_keys", parser("KEY,...", comma_list), merge=True, secret=True, owner="it holds the keys"),
    _row("--ctx-size -c", "n_ctx fit_params_min_ctx", context_size, owner="it budgets memory by it", key="ctx"),
    _row("--parallel -np", "n_parallel", integer(-1, zero_ok=False), owner="it schedules by it", key="parallel"),
    # ... and, set by nobody (no fields: never applied), flags that would move llama.cpp's API away from where the
    # gateway calls it, or make it load another model than the one the gateway fetched and budgeted.
    _row("--api-key-file", "", _path, owner="it holds the keys"),
    _row("--api-prefix", "", parser("PREFIX", str), owner="it calls llama.cpp's API at the root"),
    _row("--ssl-key-file", "", _path, owner="it calls llama.cpp over plain HTTP on 127.0.0.1"),
    _row("--ssl-cert-file", "", _path, owner="it calls llama.cpp over plain HTTP on 127.0.0.1"),
    _row("--reuse-port", "", owner="it needs the port to itself"),
    _row("--path", "", _path, owner="it serves llama.cpp's API, not files"),
    _row("--models-dir", "", _path, owner="it runs one model per llama.cpp"),
    _row("--models-preset", "", _path, owner="it runs one model per llama.cpp"),
    _row("--hf-repo -hf -hfr", "", parser("OWNER/REPO[:QUANT]", str), owner="it fetches the model", key="source"),
    _row("--hf-file -hff", "", _path, owner="it fetches the model", key="source"),
    _row("--hf-repo-draft -hfd -hfrd", "", parser("OWNER/REPO[:QUANT]", str), owner="it fetches the draft model",
         key="draft"),
    _row("--model-url -mu", "", parser("URL", str), owner="it fetches the model"),
    _row("--docker-repo -dr", "", parser("REPO[:QUANT]", str), owner="it fetches the model"),
    # Threads, batches, memory
    _row("--threads -t", "cpuparams.n_threads", _THREADS, weak=(("cpuparams_batch.n_threads", SAME),),
         owner="from LLAMA_THREADS", key="threads"),
    _row("--threads-batch -tb", "cpuparams_batch.n_threads", _THREADS),
    _row("--threads-http", "n_threads_http", integer()),
    _row("--batch-size -b", "n_batch", integer(1)),
    _row("--ubatch-size -ub", "n_ubatch", integer(1)),
    _row("--poll", "cpuparams.poll", integer(0, 100)),
    _row("--prio", "cpuparams.priority",  # low (-1) to realtime (3)
         parser("-1..3", lambda text: Native("ggml_sched_priority", (integer(-1, 3)(text),)))),
    _row("--numa", "numa", member("ggml_numa_strategy", "GGML_NUMA_STRATEGY_", "distribute isolate numactl")),
    _row("--cache-ram -cram", "cache_ram_mib", integer(-1)),
    _row("--keep", "n_keep", integer(-1)),
    _row("--n-predict -n --predict", "n_predict", integer(-2)),
    _row("--cache-reuse", "n_cache_reuse", integer(0)),
    _row("--swa-full", "swa_full"),
    _row("--kv-unified -kvu", "kv_unified", negs="--no-kv-unified -no-kvu"),
    _row("--context-shift", "ctx_shift", negs="--no-context-shift"),
    _row("--cache-prompt", "cache_prompt", negs="--no-cache-prompt"),
    _row("--cont-batching -cb", "cont_batching", negs="--no-cont-batching -nocb"),
    _row("--warmup", "warmup", negs="--no-warmup"),
    _row("--no-kv-offload -nkvo", "no_kv_offload", negs="--kv-offload -kvo"),
    _row("--no-mmap", "load_mode", negs="--mmap", on=(False, None), off=(True, None), merge=_load_half),
    _row("--mlock", "load_mode", on=(None, True), merge=_load_half),
    _row("--load-mode -lm", "load_mode", member("llama_load_mode", "LLAMA_LOAD_MODE_", "none mmap mlock mmap+mlock dio "
                                                "auto", {"mmap+mlock": "MMAP_MLOCK", "dio": "DIRECT_IO"})),
    # Attention, KV cache, RoPE
    _row("--flash-attn -fa", "flash_attn_type", choice("on off auto", _FLASH, "llama_flash_attn_type")),
    _row("--cache-type-k -ctk", "cache_type_k", _KV_TYPE),
    _row("--cache-type-v -ctv", "cache_type_v", _KV_TYPE),
    _row("--rope-scaling", "rope_scaling_type",
         member("llama_rope_scaling_type", "LLAMA_ROPE_SCALING_TYPE_", "none linear yarn")),
    _row("--rope-scale", "rope_freq_scale", rope_scale),
    _row("--rope-freq-base", "rope_freq_base", number),
    _row("--rope-freq-scale", "rope_freq_scale", number),
    _row("--yarn-orig-ctx", "yarn_orig_ctx", integer(0)),
    _row("--yarn-ext-factor", "yarn_ext_factor", number),
    _row("--yarn-attn-factor", "yarn_attn_factor", number),
    _row("--yarn-beta-slow", "yarn_beta_slow", number),
    _row("--yarn-beta-fast", "yarn_beta_fast", number),
    # GPUs, and which weights stay on the CPU
    _row("--n-gpu-layers -ngl --gpu-layers", "n_gpu_layers", _LAYERS),
    _row("--main-gpu -mg", "main_gpu", integer(0)),
    _row("--split-mode -sm", "split_mode", member("llama_split_mode", "LLAMA_SPLIT_MODE_", "none layer row tensor")),
    _row("--tensor-split -ts", "tensor_split",
         parser("N0,N1,...", lambda text: Padded(tuple(map(number, text.replace("/", ",").split(",")))))),
    _row("--override-tensor -ot", "tensor_buft_overrides", tensor_overrides, merge=True),
    _row("--cpu-moe -cmoe", "tensor_buft_overrides", on=_EXPERTS + "=CPU", merge=True),
    _row("--n-cpu-moe -ncmoe", "tensor_buft_overrides", parser("N >= 0", lambda text: ",".join(  # first N layers'
         rf"blk\.{layer}{_EXPERTS}=CPU" for layer in range(integer(0)(text))) or None), merge=True),
    _row("--fit -fit", "fit_params", choice("on off", {**dict.fromkeys(_TRUE, True), **dict.fromkeys(_FALSE, False)})),
    _row("--fit-ctx -fitc", "fit_params_min_ctx", integer(0)),
    # Embeddings and reranking: --pooling counts only with embeddings on, as the child always had it
    _row("--embeddings --embedding", "embedding", owner="from LLAMA_EMBEDDINGS", key="embeddings"),
    _row("--pooling", "pooling_type", member("llama_pooling_type", "LLAMA_POOLING_TYPE_", "none mean cls last rank"),
         needs="embedding"),
    _row("--rerank --reranking", "embedding pooling_type",
         on=(True, Native("llama_pooling_type.LLAMA_POOLING_TYPE_RANK")), owner="it serves /v1/rerank by it",
         key="rerank"),
    # Vision and audio projectors
    _row("--mmproj -mm", "mmproj.path", _path, owner="it fetches the projector (\"auto\": from the hf: repo)",
         key="mmproj"),
    _row("--no-mmproj --no-mmproj-auto", "no_mmproj", negs="--mmproj-auto"),
    _row("--mmproj-offload", "mmproj_use_gpu", negs="--no-mmproj-offload"),
    # Speculative decoding: a draft model alone means the simple draft, as measured with xllamacpp
    _row("--spec-draft-model -md --model-draft", "speculative.draft.mparams.path", _path,
         weak=(("speculative.types", _DRAFT_SIMPLE),), owner="it fetches the draft model (an hf: spec too)",
         key="draft"),
    _row("--spec-type", "speculative.types",
         parser(_SPEC.hint.replace("|", ","), lambda text: [_SPEC(word) for word in comma_list(text)]), merge=True),
    _row("--spec-draft-n-max --draft-max --draft --draft-n", "speculative.draft.n_max", integer(0)),
    _row("--spec-draft-n-min --draft-min --draft-n-min", "speculative.draft.n_min", integer(0)),
    _row("--spec-draft-p-min --draft-p-min", "speculative.draft.p_min", number),
    _row("--spec-draft-p-split --draft-p-split", "speculative.draft.p_split", number),
    _row("--spec-draft-ngl -ngld --gpu-layers-draft --n-gpu-layers-draft", "speculative.draft.n_gpu_layers", _LAYERS),
    _row("--spec-draft-type-k -ctkd --cache-type-k-draft", "speculative.draft.cache_type_k", _KV_TYPE),
    _row("--spec-draft-type-v -ctvd --cache-type-v-draft", "speculative.draft.cache_type_v", _KV_TYPE),
    _row("--spec-draft-threads -td --threads-draft", "speculative.draft.cpuparams.n_threads", _THREADS,
         weak=(("speculative.draft.cpuparams_batch.n_threads", SAME),)),
    # Adapters, chat templates, reasoning
    _row("--lora", "lora_adapters",
         parser("FNAME,...", lambda text: [Native(LORA, (path, 1.0)) for path in comma_list(text)]), merge=True),
    _row("--lora-scaled", "lora_adapters", lora_scaled, merge=True),
    _row("--chat-template", "chat_template", parser("JINJA_TEMPLATE", str)),
    _row("--chat-template-file", "chat_template", file_text),
    _row("--chat-template-kwargs", "default_template_kwargs", template_kwargs, merge=True),
    _row("--jinja", "use_jinja", negs="--no-jinja"),
    _row("--prefill-assistant", "prefill_assistant", negs="--no-prefill-assistant"),
    _row("--reasoning-format", "reasoning_format",
         member("common_reasoning_format", "COMMON_REASONING_FORMAT_", "none auto deepseek deepseek-legacy")),
    _row("--reasoning -rea", "enable_reasoning default_template_kwargs", choice("on off auto", _THINK), merge=True),
    _row("--reasoning-budget", "sampling.reasoning_budget_tokens", integer(-1)),
    # Sampling: llama-server's defaults for requests that send none (merged: their marks add up, the last value wins)
    _sampling("--temp --temperature", "temp", parser("N", lambda text: max(number(text), 0.0))),
    _sampling("--top-k", "top_k", integer()),
    _sampling("--top-p", "top_p"),
    _sampling("--min-p", "min_p"),
    _sampling("--repeat-last-n", "penalty_last_n n_prev",  # -1: the context; n_prev: at least llama.cpp's 64
              parser("N >= -1", lambda text: (lambda last: (last, max(last, 64)))(integer(-1)(text)))),
    _sampling("--repeat-penalty", "penalty_repeat"),
    _sampling("--presence-penalty", "penalty_present"),
    _sampling("--frequency-penalty", "penalty_freq"),
    _sampling("--seed -s", "seed", parser("N >= -1", lambda text: integer(-1, 2 ** 32 - 1)(text) % 2 ** 32)),
    # The server itself
    _row("--slots", "endpoint_slots", negs="--no-slots"),
    _row("--props", "endpoint_props"),
    _row("--slot-save-path", "slot_save_path", made_directory),
    _row("--slot-prompt-similarity -sps", "slot_prompt_similarity", number),
    _row("--sleep-idle-seconds", "sleep_idle_seconds", integer(-1, zero_ok=False)),
    _row("--timeout -to", "timeout_read timeout_write", parser("N >= 0", lambda text: (integer(0)(text),) * 2)),
    _row("--ui --webui", "ui", negs="--no-ui --no-webui"),
    _row("--verbosity -lv --log-verbosity", "verbosity", integer(0)),
    _row("--hf-token -hft", "hf_token", parser("TOKEN", str), secret=True),
)

_NUMBER = re.compile(r"-?\d+(\.\d*)?([eE][-+]?\d+)?")  # a value such as -1, which is not a flag
# Each spelling -> (its flag, whether it turns the flag on); built once from the constant table above.
_SPELLINGS = {name: (flag, True) for flag in FLAGS for name in flag.names}
_SPELLINGS.update({name: (flag, False) for flag in FLAGS for name in flag.negs})


def known_flags() -> list:
    """The first spelling of every flag a model's args may set (the table's others the gateway sets), sorted."""
    return sorted(flag.names[0] for flag in FLAGS if not flag.owner)


def _lookup(token):
    # llama.cpp reads --n_gpu_layers as --n-gpu-layers
    return _SPELLINGS.get(token.replace("_", "-") if token.startswith("--") else token, (None, True))


def _scan(argv):
    """The flags in argv as (flag, spelling, value), one FlagError per problem, and every known flag written, as
    (flag, spelling), whether its value is good or not."""
    found, trouble, seen, i, argv, last = [], [], [], 0, [str(token) for token in argv], "the start"
    while i < len(argv):
        token, i = argv[i], i + 1
        flag, positive = _lookup(token)
        if flag is not None:
            seen.append((flag, token))
        if flag is None and token.startswith("-") and "=" in token and not _NUMBER.fullmatch(token):
            # llama.cpp takes no --flag=value form, and says so quoting the whole token: only the flag is named,
            # the value may be a key. A flag the gateway sets is still its own message (owned).
            name = token.split("=", 1)[0]
            joined = _lookup(name)[0]
            seen += [(joined, name)] if joined else []
            trouble.append(FlagError(name, f"{name}=...: llama.cpp takes no {name}=VALUE form: write the flag and "
                                     "its value as two strings", any_build=True))
        elif flag is None and token.startswith("-") and not _NUMBER.fullmatch(token):
            close = difflib.get_close_matches(token, _SPELLINGS, n=1)
            trouble.append(FlagError(token, f"unknown flag {token}" + (f" (did you mean {close[0]}?)" if close else "")
                                     + "; known flags: " + " ".join(known_flags())))
            while i < len(argv) and (not argv[i].startswith("-") or _NUMBER.fullmatch(argv[i])):
                i += 1  # its values, whatever they are: one problem is enough
        elif flag is None:  # the value itself is never shown: it may be a key written in the wrong place
            trouble.append(FlagError(token, f"a value without a flag at position {i}, after {last}"))
        elif flag.parse is None:
            found.append((flag, token, flag.on if positive else flag.off))
        elif i >= len(argv):
            trouble.append(FlagError(token, f"{token} needs a value ({flag.parse.hint})"))
        else:
            text, i = argv[i], i + 1
            try:
                found.append((flag, token, flag.parse(text)))
            except (ValueError, OSError) as error:
                shown, reason = "(hidden)" if flag.secret else repr(text), getattr(error, "strerror", None) or error
                trouble.append(FlagError(token, f"{token}: bad value {shown}: {reason} (expected {flag.parse.hint})"))
        last = token if flag else last
    return found, trouble, seen


def problems(argv) -> list:
    """Every problem in argv, one FlagError each (unknown flag, missing or bad value); empty when it is fine."""
    return _scan(argv)[1]


def owned(argv) -> list:
    """A FlagError for each flag in argv that the gateway sets itself (its value good or not), saying why and
    which key of the models file sets it instead."""
    return [FlagError(token, f"{token} is set by the gateway ({flag.owner}): " +
                      (f"use the models file's key {flag.key} instead" if flag.key else "remove it"))
            for flag, token in _scan(argv)[2] if flag.owner]


def check_user_args(args, model_id=None, *, binary=False) -> list:
    """Every problem with a model's own llama-server args (spec.args), one message each, naming the model
    (models.ID.args: ...) when model_id is given: a flag the gateway sets itself, and an unknown flag or a bad value.

    With binary (a llama-server program, LLAMA_SERVER_BIN or on PATH), only the flags the gateway sets and what
    every llama.cpp refuses (--flag=value) are checked: the program may be newer than this table and know flags and
    values it does not, and it says so itself, in the one line the start error leads with."""
    mine = owned(args)
    taken = {error.flag for error in mine}
    found = mine + [error for error in problems(args) if error.flag not in taken and (error.any_build or not binary)]
    where = f"models.{model_id}.args: " if model_id else ""
    return [where + str(error) for error in found]


def _merged(old, new):
    if isinstance(new, str):  # tensor overrides: one comma-separated list
        return f"{old},{new}"
    return old + new if isinstance(new, list) else old | new if isinstance(new, (dict, set, Bit)) else new


def _collect(found):
    strong, weak = {}, {}
    for flag, token, value in found:
        values = value if len(flag.fields) > 1 else (value,)
        for field, one in zip(flag.fields, values):
            if one is not None:
                so_far = strong[field][0] if field in strong else None
                merged = flag.merge(so_far, one) if callable(flag.merge) else (
                    _merged(so_far, one) if flag.merge and field in strong else one)
                strong[field] = (merged, token)
        for field, one in flag.weak:
            weak[field] = (value if one is SAME else one, token)
    return {**{field: pair for field, pair in weak.items() if field not in strong}, **strong}


def _plan(argv):
    found, trouble, _ = _scan(argv)
    if trouble:
        raise trouble[0]
    settled = _collect(item for item in found if not item[0].needs)
    return _collect(item for item in found if not item[0].needs or settled.get(item[0].needs, (False,))[0])


def plan(argv) -> dict:
    """What argv sets: CommonParams field path -> value (Native for xllamacpp objects); raises the first FlagError."""
    return {field: value for field, (value, _) in _plan(argv).items()}


def _native(value, xllamacpp):
    if isinstance(value, Native):
        found = functools.reduce(getattr, value.path.split("."), xllamacpp)
        return found if value.args is None else found(*value.args)
    if isinstance(value, (list, set)):
        return type(value)(_native(item, xllamacpp) for item in value)
    return value


def apply(params, argv):
    """Set on xllamacpp CommonParams what argv asks, as llama-server would; raises FlagError naming the flag."""
    import xllamacpp  # only here: the gateway checks flags without it

    for field, (value, token) in _plan(argv).items():
        *path, name = field.split(".")
        try:
            target = functools.reduce(getattr, path, params)
            if isinstance(value, Padded):  # one entry per possible device
                length = len(getattr(target, name))
                if len(value.values) >= length:
                    raise ValueError(f"more values than this build's {length - 1} devices")
                value = list(value.values) + [0.0] * (length - len(value.values))
            setattr(target, name, _native(value, xllamacpp))
        except (ValueError, TypeError, AttributeError, OverflowError, AssertionError) as error:
            # xllamacpp checks some values only here (a buffer type for -ot); an older build may lack a field
            raise FlagError(token, f"{token}: llama.cpp refused it: {error}") from None
    return params


def command_line(argv, program="llama-server", *, windows=None) -> str:
    """argv as one command line for display, quoted for this platform, secret values hidden."""
    shown, hide = [], False
    for token in (str(token) for token in argv):
        # a --flag=value token is refused (llama.cpp takes none), and its value, perhaps a key, is never shown
        joined = token.startswith("-") and "=" in token and not _NUMBER.fullmatch(token)
        shown.append("***" if hide else token.split("=", 1)[0] + "=***" if joined else token)
        flag = _lookup(token)[0]
        hide = not hide and bool(flag and flag.secret and flag.parse)
    words = ([program] if program else []) + shown
    return subprocess.list2cmdline(words) if (os.name == "nt" if windows is None else windows) else shlex.join(words)
