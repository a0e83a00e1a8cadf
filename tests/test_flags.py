"""The llama-server flag table: each flag reaches xllamacpp's CommonParams, errors name the flag, and llama.cpp runs
with what the table built (quantised KV cache, flash attention, a draft model)."""
import os
import queue
import re
import subprocess
import sys
import threading

import pytest
import requests
import xllamacpp

from service.llama.flags import FLAGS, FlagError, apply, command_line, known_flags, plan, problems
from service.llama.supervisor import LlamaSupervisor
from service.models.demo_model import write_demo_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERTS = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
TEMPLATE = "{% for message in messages %}{{ message.content }}{% endfor %}"

# argv -> a CommonParams field (dotted) and what it reads back as: enum members by name, LoRA adapters as
# (path, scale), tensor_split by its first three entries. {dir} and {file} are a directory and a template file.
CASES = [
    (["--model", "/m/x.gguf"], "model.path", "/m/x.gguf"),
    (["--host", "0.0.0.0"], "hostnames", ["0.0.0.0"]),
    (["--port", "8081"], "port", 8081),
    (["--alias", "a, b"], "model_alias", {"a", "b"}),
    (["--metrics"], "endpoint_metrics", True),
    (["--api-key", "k1,k2"], "api_keys", ["k1", "k2"]),
    (["--ctx-size", "4096"], "n_ctx", 4096),
    (["--ctx-size", "0"], "fit_params_min_ctx", 2 ** 31 - 1),
    (["--parallel", "3"], "n_parallel", 3),
    (["--threads", "3"], "cpuparams.n_threads", 3),
    (["--threads", "3"], "cpuparams_batch.n_threads", 3),
    (["--threads-batch", "2"], "cpuparams_batch.n_threads", 2),
    (["--threads-http", "12"], "n_threads_http", 12),
    (["--batch-size", "64"], "n_batch", 64),
    (["--ubatch-size", "32"], "n_ubatch", 32),
    (["--poll", "10"], "cpuparams.poll", 10),
    (["--prio", "2"], "cpuparams.priority", "GGML_SCHED_PRIO_HIGH"),
    (["--numa", "isolate"], "numa", "GGML_NUMA_STRATEGY_ISOLATE"),
    (["--cache-ram", "0"], "cache_ram_mib", 0),
    (["--keep", "-1"], "n_keep", -1),
    (["--n-predict", "128"], "n_predict", 128),
    (["--cache-reuse", "256"], "n_cache_reuse", 256),
    (["--swa-full"], "swa_full", True),
    (["--kv-unified"], "kv_unified", True),
    (["--no-kv-unified"], "kv_unified", False),
    (["--context-shift"], "ctx_shift", True),
    (["--no-cache-prompt"], "cache_prompt", False),
    (["--no-cont-batching"], "cont_batching", False),
    (["--no-warmup"], "warmup", False),
    (["--no-kv-offload"], "no_kv_offload", True),
    (["--kv-offload"], "no_kv_offload", False),
    (["--no-mmap"], "load_mode", "LLAMA_LOAD_MODE_NONE"),
    (["--mmap"], "load_mode", "LLAMA_LOAD_MODE_MMAP"),
    (["--mlock"], "load_mode", "LLAMA_LOAD_MODE_MMAP_MLOCK"),  # mmap stays on, as llama.cpp's use_mlock left it
    (["--load-mode", "mmap+mlock"], "load_mode", "LLAMA_LOAD_MODE_MMAP_MLOCK"),
    (["--flash-attn", "on"], "flash_attn_type", "LLAMA_FLASH_ATTN_TYPE_ENABLED"),
    (["--flash-attn", "off"], "flash_attn_type", "LLAMA_FLASH_ATTN_TYPE_DISABLED"),
    (["--cache-type-k", "q8_0"], "cache_type_k", "GGML_TYPE_Q8_0"),
    (["--cache-type-v", "q4_0"], "cache_type_v", "GGML_TYPE_Q4_0"),
    (["--rope-scaling", "yarn"], "rope_scaling_type", "LLAMA_ROPE_SCALING_TYPE_YARN"),
    (["--rope-scale", "4"], "rope_freq_scale", 0.25),
    (["--rope-freq-base", "10000"], "rope_freq_base", 10000.0),
    (["--rope-freq-scale", "0.5"], "rope_freq_scale", 0.5),
    (["--yarn-orig-ctx", "8192"], "yarn_orig_ctx", 8192),
    (["--yarn-ext-factor", "0.5"], "yarn_ext_factor", 0.5),
    (["--yarn-attn-factor", "1.5"], "yarn_attn_factor", 1.5),
    (["--yarn-beta-slow", "1"], "yarn_beta_slow", 1.0),
    (["--yarn-beta-fast", "32"], "yarn_beta_fast", 32.0),
    (["--n-gpu-layers", "99"], "n_gpu_layers", 99),
    (["--n-gpu-layers", "all"], "n_gpu_layers", -2),
    (["--n-gpu-layers", "auto"], "n_gpu_layers", -1),
    (["--main-gpu", "1"], "main_gpu", 1),
    (["--split-mode", "row"], "split_mode", "LLAMA_SPLIT_MODE_ROW"),
    (["--tensor-split", "3,1"], "tensor_split", [3.0, 1.0, 0.0]),
    (["--override-tensor", r"blk\.0\.ffn_up_exps=CPU"], "tensor_buft_overrides", r"blk\.0\.ffn_up_exps=CPU"),
    (["--cpu-moe"], "tensor_buft_overrides", EXPERTS + "=CPU"),
    (["--n-cpu-moe", "2"], "tensor_buft_overrides", rf"blk\.0{EXPERTS}=CPU,blk\.1{EXPERTS}=CPU"),
    (["--fit", "off"], "fit_params", False),
    (["--fit-ctx", "2048"], "fit_params_min_ctx", 2048),
    (["--embeddings"], "embedding", True),
    (["--pooling", "cls", "--embeddings"], "pooling_type", "LLAMA_POOLING_TYPE_CLS"),
    (["--rerank"], "embedding", True),
    (["--rerank"], "pooling_type", "LLAMA_POOLING_TYPE_RANK"),
    (["--mmproj", "/m/p.gguf"], "mmproj.path", "/m/p.gguf"),
    (["--no-mmproj"], "no_mmproj", True),
    (["--no-mmproj-offload"], "mmproj_use_gpu", False),
    (["--spec-draft-model", "/m/d.gguf"], "speculative.draft.mparams.path", "/m/d.gguf"),
    (["--spec-draft-model", "/m/d.gguf"], "speculative.types", ["COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE"]),
    (["--spec-type", "ngram-mod,ngram-simple"], "speculative.types",
     ["COMMON_SPECULATIVE_TYPE_NGRAM_MOD", "COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE"]),
    (["--spec-draft-n-max", "8"], "speculative.draft.n_max", 8),
    (["--spec-draft-n-min", "1"], "speculative.draft.n_min", 1),
    (["--spec-draft-p-min", "0.75"], "speculative.draft.p_min", 0.75),
    (["--spec-draft-p-split", "0.25"], "speculative.draft.p_split", 0.25),
    (["--spec-draft-ngl", "0"], "speculative.draft.n_gpu_layers", 0),
    (["--spec-draft-type-k", "q8_0"], "speculative.draft.cache_type_k", "GGML_TYPE_Q8_0"),
    (["--spec-draft-type-v", "q8_0"], "speculative.draft.cache_type_v", "GGML_TYPE_Q8_0"),
    (["--spec-draft-threads", "2"], "speculative.draft.cpuparams_batch.n_threads", 2),
    (["--lora", "/m/a.gguf,/m/b.gguf"], "lora_adapters", [("/m/a.gguf", 1.0), ("/m/b.gguf", 1.0)]),
    (["--lora-scaled", "/m/a.gguf:0.5"], "lora_adapters", [("/m/a.gguf", 0.5)]),
    (["--chat-template", "chatml"], "chat_template", "chatml"),
    (["--chat-template-file", "{file}"], "chat_template", TEMPLATE),
    (["--chat-template-kwargs", '{"enable_thinking": false, "x": [1, "é"]}'], "default_template_kwargs",
     {"enable_thinking": "false", "x": '[1,"é"]'}),
    (["--no-jinja"], "use_jinja", False),
    (["--no-prefill-assistant"], "prefill_assistant", False),
    (["--reasoning-format", "deepseek-legacy"], "reasoning_format", "COMMON_REASONING_FORMAT_DEEPSEEK_LEGACY"),
    (["--reasoning", "off"], "enable_reasoning", 0),
    (["--reasoning", "on"], "default_template_kwargs", {"enable_thinking": "true"}),
    (["--reasoning-budget", "256"], "sampling.reasoning_budget_tokens", 256),
    (["--temp", "0.5"], "sampling.temp", 0.5),
    (["--temperature", "-1"], "sampling.temp", 0.0),  # llama.cpp takes a negative temperature as 0 (greedy)
    (["--top-k", "20"], "sampling.top_k", 20),
    (["--top-p", "0.5"], "sampling.top_p", 0.5),
    (["--min-p", "0.25"], "sampling.min_p", 0.25),
    (["--repeat-last-n", "128"], "sampling.penalty_last_n", 128),
    (["--repeat-last-n", "128"], "sampling.n_prev", 128),
    (["--repeat-penalty", "1.5"], "sampling.penalty_repeat", 1.5),
    (["--presence-penalty", "0.5"], "sampling.penalty_present", 0.5),
    (["--frequency-penalty", "0.25"], "sampling.penalty_freq", 0.25),
    (["--seed", "42"], "sampling.seed", 42),
    (["-s", "-1"], "sampling.seed", 2 ** 32 - 1),  # llama.cpp's default seed: a random one
    (["--no-slots"], "endpoint_slots", False),
    (["--props"], "endpoint_props", True),
    (["--slot-save-path", "{dir}"], "slot_save_path", "{dir}" + os.sep),
    (["--slot-prompt-similarity", "0.5"], "slot_prompt_similarity", 0.5),
    (["--sleep-idle-seconds", "300"], "sleep_idle_seconds", 300),
    (["--timeout", "30"], "timeout_write", 30),
    (["--no-ui"], "ui", False),
    (["--verbosity", "4"], "verbosity", 4),
    (["--hf-token", "hf_x"], "hf_token", "hf_x"),
]


@pytest.fixture
def places(tmp_path):
    """What {dir} and {file} stand for in CASES."""
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE, encoding="utf-8")
    return {"{dir}": str(tmp_path), "{file}": str(template)}


def filled(value, places):
    """value with {dir} and {file} put in."""
    for mark, path in places.items():
        value = value.replace(mark, path) if isinstance(value, str) else value
    return value


def read(params, field):
    """A CommonParams field as plain data: enum members by name, LoRA adapters as (path, scale)."""
    value = params
    for part in field.split("."):
        value = getattr(value, part)
    if field == "tensor_split":
        return value[:3]
    if field == "lora_adapters":
        return [(adapter.path, adapter.scale) for adapter in value]
    if isinstance(value, list):
        return [getattr(item, "name", item) for item in value]
    return getattr(value, "name", value)


@pytest.mark.parametrize("argv, field, expected", CASES, ids=[f"{' '.join(case[0])} -> {case[1]}" for case in CASES])
def test_each_flag_reaches_its_common_params_field(argv, field, expected, places):
    params = apply(xllamacpp.CommonParams(), [filled(token, places) for token in argv])
    assert read(params, field) == filled(expected, places)


def test_every_flag_in_the_table_has_a_case():
    tried = {case[0][0] for case in CASES}
    untried = [flag.names[0] for flag in FLAGS if flag.fields and not tried & set(flag.names + flag.negs)]
    assert not untried
    # a row that sets nothing is one the gateway refuses in a model's args: never applied
    assert all(flag.owner for flag in FLAGS if not flag.fields)


def test_every_field_the_table_names_exists_in_the_installed_xllamacpp():
    params = xllamacpp.CommonParams()
    for flag in FLAGS:
        for field in flag.fields + tuple(field for field, _ in flag.weak) + ((flag.needs,) if flag.needs else ()):
            value = params
            for part in field.split("."):
                value = getattr(value, part)  # AttributeError names the missing one


def test_every_word_a_flag_takes_names_a_member_of_the_installed_xllamacpp():
    # hints such as f32|f16|... and none,draft-simple,...: every word listed is one the flag takes
    worded = [flag for flag in FLAGS if flag.parse and re.fullmatch(r"[\w+-]+([|,][\w+-]+)+", flag.parse.hint)]
    assert len(worded) >= 15
    for flag in worded:
        for word in re.split("[|,]", flag.parse.hint):
            if word != "N":
                apply(xllamacpp.CommonParams(), ["--embeddings", flag.names[0], word])


def test_every_spelling_of_a_flag_does_the_same():
    values = {case[0][0]: case[0][1:] for case in reversed(CASES)}
    compared = 0
    for flag in (flag for flag in FLAGS if flag.fields):  # a row without fields sets nothing to compare
        for spellings in (flag.names, flag.negs):
            if len(spellings) > 1:
                value = next(values[name] for name in flag.names + flag.negs if name in values) if flag.parse else []
                plans = [plan([spelling, *value]) for spelling in spellings]
                assert plans == [plans[0]] * len(spellings), spellings
                compared += 1
    assert compared >= 40
    assert plan(["--n_gpu_layers", "7"]) == plan(["-ngl", "7"])  # llama.cpp reads _ as - in long flags


def test_the_supervisors_own_command_line_sets_what_the_child_always_set():
    supervisor = LlamaSupervisor("/m/demo.gguf", port=8090, ctx=2048, parallel=3, threads=2, threads_batch=4,
                                 batch=256, threads_http=12, embeddings=True, pooling="mean", alias="demo",
                                 cache_ram=64)
    params = apply(xllamacpp.CommonParams(), supervisor.flags)
    assert {field: read(params, field) for field in (
        "model.path", "hostnames", "port", "n_ctx", "n_parallel", "cpuparams.n_threads", "cpuparams_batch.n_threads",
        "n_batch", "n_threads_http", "cache_ram_mib", "embedding", "pooling_type", "model_alias", "endpoint_metrics",
    )} == {"model.path": "/m/demo.gguf", "hostnames": ["127.0.0.1"], "port": 8090, "n_ctx": 2048, "n_parallel": 3,
           "cpuparams.n_threads": 2, "cpuparams_batch.n_threads": 4, "n_batch": 256, "n_threads_http": 12,
           "cache_ram_mib": 64, "embedding": True, "pooling_type": "LLAMA_POOLING_TYPE_MEAN",
           "model_alias": {"demo"}, "endpoint_metrics": True}


def test_threads_set_the_batch_threads_unless_threads_batch_does_in_any_order():
    assert plan(["-t", "4"])["cpuparams_batch.n_threads"] == 4
    assert plan(["-tb", "2", "-t", "4"])["cpuparams_batch.n_threads"] == 2
    assert plan(["-t", "4", "-tb", "2"])["cpuparams_batch.n_threads"] == 2


def test_pooling_counts_only_with_embeddings_on():
    assert "pooling_type" not in plan(["--pooling", "mean"])
    assert plan(["--pooling", "mean", "--embeddings"])["pooling_type"].path.endswith("MEAN")


def test_a_spec_type_replaces_the_simple_draft_a_draft_model_implies():
    assert read(apply(xllamacpp.CommonParams(), ["-md", "/m/d.gguf", "--spec-type", "draft-eagle3"]),
                "speculative.types") == ["COMMON_SPECULATIVE_TYPE_DRAFT_EAGLE3"]


def test_repeats_add_up_where_llama_cpp_adds_them_and_the_last_wins_elsewhere():
    params = apply(xllamacpp.CommonParams(), ["-ot", "a=CPU", "--n-cpu-moe", "1", "--lora", "/a", "--lora", "/b",
                                              "-c", "1024", "-c", "2048", "--mlock", "--no-mmap",
                                              "--chat-template-kwargs", '{"x": 1}', "--reasoning", "off"])
    assert read(params, "tensor_buft_overrides") == rf"a=CPU,blk\.0{EXPERTS}=CPU"
    assert read(params, "lora_adapters") == [("/a", 1.0), ("/b", 1.0)]
    assert (read(params, "n_ctx"), read(params, "load_mode")) == (2048, "LLAMA_LOAD_MODE_MLOCK")
    assert read(params, "default_template_kwargs") == {"x": "1", "enable_thinking": "false"}


@pytest.mark.parametrize("argv, flag, words", [
    (["--cache-type-k", "q9"], "--cache-type-k", ["'q9'", "q8_0"]),
    (["-ngl", "abc"], "-ngl", ["'abc'", "whole number", "auto|all"]),
    (["--flash-attn", "maybe"], "--flash-attn", ["'maybe'", "on|off|auto"]),
    (["--parallel", "0"], "--parallel", ["out of range", "not 0"]),
    (["--poll", "101"], "--poll", ["0..100"]),
    (["--rope-scale", "0"], "--rope-scale", ["not 0"]),
    (["--reasoning-budget", "-2"], "--reasoning-budget", ["out of range"]),
    (["--sleep-idle-seconds", "0"], "--sleep-idle-seconds", ["out of range"]),
    (["-ot", "no-buffer"], "-ot", ["PATTERN=BUFFER"]),
    (["--lora-scaled", "/m/a.gguf"], "--lora-scaled", ["FNAME:SCALE"]),
    (["--chat-template-kwargs", "[1]"], "--chat-template-kwargs", ["JSON object"]),
    (["--chat-template-file", "/no/such/template.jinja"], "--chat-template-file", ["No such file"]),
    (["--spec-type", "draft-magic"], "--spec-type", ["draft-simple"]),
    (["--ctx-size"], "--ctx-size", ["needs a value"]),
    (["--ctx-size=4096"], "--ctx-size", ["--ctx-size=...", "two strings"]),  # llama.cpp takes no =value either
    (["--n-gpu-layer", "9"], "--n-gpu-layer", ["unknown flag", "did you mean --n-gpu-layers?"]),
    (["--ctx-shift"], "--ctx-shift", ["unknown flag", "known flags: ", "--context-shift", "--tensor-split"]),
    (["--tmep", "0.5"], "--tmep", ["unknown flag", "did you mean --temp?"]),
    (["--temp", "warm"], "--temp", ["not a number"]),
    (["--top-k", "0.5"], "--top-k", ["not a whole number"]),
    (["--repeat-last-n", "-2"], "--repeat-last-n", ["out of range"]),  # llama.cpp refuses it too
    (["--seed", "4294967296"], "--seed", ["out of range"]),
])
def test_each_problem_is_one_error_naming_the_flag(argv, flag, words):
    [error] = problems(argv)
    assert error.flag == flag and str(error).startswith(flag) or str(error).startswith("unknown flag " + flag)
    for word in words:
        assert word in str(error)


def test_every_problem_in_an_argv_is_reported_and_a_good_argv_has_none(tmp_path):
    found = problems(["-ngl", "abc", "--nope", "3", "-1", "--jinja", "stray", "-fa", "on", "-ctk"])
    assert [error.flag for error in found] == ["-ngl", "--nope", "stray", "-ctk"]
    assert "after --jinja" in str(found[2])
    assert problems(["-m", "x.gguf", "-ngl", "-1", "-fa", "on", "--jinja", "--slot-save-path", str(tmp_path)]) == []
    assert "--n-gpu-layers" in known_flags() and "--temp" in known_flags()


def test_the_known_flags_an_unknown_one_lists_leave_out_those_the_gateway_sets():
    [error] = problems(["--tmp", "0.5"])
    listed = str(error).split("; known flags: ", 1)[1].split()
    assert "--temp" in listed and "--n-gpu-layers" in listed
    assert not {"--model", "--port", "--ctx-size", "--api-key", "--hf-repo"} & set(listed)
    assert listed == known_flags()


def test_sampling_flags_mark_their_fields_as_the_user_s_as_llama_cpp_does():
    # A marked field keeps the user's value over the sampling a GGUF recommends; the marks of several flags add up.
    bits = {name: int(getattr(xllamacpp.common_params_sampling_config, "COMMON_PARAMS_SAMPLING_CONFIG_" + name))
            for name in ("TEMP", "TOP_K", "TOP_P", "MIN_P", "PENALTY_LAST_N", "PENALTY_REPEAT")}
    marks = dict(zip(("--temp", "--top-k", "--top-p", "--min-p", "--repeat-last-n", "--repeat-penalty"), bits.values()))
    for flag, mark in marks.items():
        assert apply(xllamacpp.CommonParams(), [flag, "1"]).sampling.user_sampling_config == mark, flag
    both = apply(xllamacpp.CommonParams(), ["--temp", "0.5", "--seed", "7", "--top-k", "5", "--temp", "0.75"])
    assert both.sampling.user_sampling_config == bits["TEMP"] | bits["TOP_K"]
    assert (both.sampling.temp, both.sampling.top_k, both.sampling.seed) == (0.75, 5, 7)  # the last value wins
    unmarked = apply(xllamacpp.CommonParams(), ["--seed", "7", "--presence-penalty", "1", "--frequency-penalty", "1"])
    assert unmarked.sampling.user_sampling_config == 0


def test_a_secret_is_never_shown():
    [stray, bad] = problems(["--api-key", "k1", "sk-secret-1", "--api-key", ", ,"])
    assert "sk-secret-1" not in str(stray) and "(hidden)" in str(bad)
    assert "sk-secret-2" not in command_line(["--api-key", "sk-secret-2", "--jinja"])


def test_load_mode_flags_combine_mmap_and_mlock_in_any_order():
    def mode(*argv):
        return plan(argv)["load_mode"].path.rsplit("_MODE_", 1)[1]
    assert [mode("--mlock"), mode("--no-mmap"), mode("--mmap")] == ["MMAP_MLOCK", "NONE", "MMAP"]
    assert mode("--mlock", "--no-mmap") == mode("--no-mmap", "--mlock") == "MLOCK"
    assert mode("--no-mmap", "--mlock", "--mmap") == "MMAP_MLOCK"
    assert mode("--load-mode", "none", "--mlock") == "MLOCK" and mode("--mlock", "--load-mode", "dio") == "DIRECT_IO"


def test_apply_stops_at_the_first_problem_and_names_the_flag_llama_cpp_refuses():
    with pytest.raises(FlagError) as caught:
        apply(xllamacpp.CommonParams(), ["-ngl", "abc"])
    assert caught.value.flag == "-ngl"
    with pytest.raises(FlagError, match="unknown buffer type") as caught:
        apply(xllamacpp.CommonParams(), ["-ot", "blk=NO_SUCH_BUFFER"])  # only llama.cpp knows its buffers
    assert caught.value.flag == "-ot"
    with pytest.raises(FlagError, match="devices") as caught:
        apply(xllamacpp.CommonParams(), ["-ts", ",".join(["1"] * 200)])
    assert caught.value.flag == "-ts"


def test_command_line_quotes_for_the_platform():
    argv = ["--chat-template", "a b", "-m", "C:\\m\\x.gguf"]
    assert command_line(argv, windows=False) == "llama-server --chat-template 'a b' -m 'C:\\m\\x.gguf'"
    assert command_line(argv, windows=True) == 'llama-server --chat-template "a b" -m C:\\m\\x.gguf'
    assert command_line(["-ngl", "9"], program=None, windows=False) == "-ngl 9"


def test_checking_flags_does_not_import_xllamacpp():
    code = ("import sys; from service.llama import flags; flags.problems(['-fa', 'on', '-ctk', 'q8_0']); "
            "flags.plan(['-md', 'd.gguf', '--lora', 'a.gguf', '--prio', '2']); flags.owned(['--port', '1']); "
            "flags.command_line(['-m', 'x']); print(sorted(name for name in sys.modules if 'xllamacpp' in name))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


# Serves llama.cpp in its own process with the params the table built, until its stdin closes.
SERVE = r"""
import os, sys, xllamacpp
from service.llama.flags import apply
server = xllamacpp.Server(apply(xllamacpp.CommonParams(), sys.argv[1:]))
print("serving on", server.listening_address, flush=True)
sys.stdin.read()
os._exit(0)  # llama.cpp's threads could hold up a normal exit
"""


@pytest.mark.llama
def test_llama_cpp_runs_a_quantised_kv_cache_and_a_draft_model_from_the_table(tmp_path):
    # q8_0 KV needs a head size that is a multiple of 32: 128 wide over 4 heads. The draft shares the vocabulary.
    model = write_demo_model(str(tmp_path / "wide.gguf"), embedding_size=128)
    draft = write_demo_model(str(tmp_path / "draft.gguf"), seed=1)
    argv = ["--model", model, "--host", "127.0.0.1", "--port", "0", "-c", "512", "-np", "1", "-t", "1", "-lv", "4",
            "--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "-fa", "on", "-md", draft, "--draft-max", "4"]
    log = tmp_path / "llama.log"  # llama.cpp's own account, apart from the line saying where it serves
    with open(log, "w") as errors:
        process = subprocess.Popen([sys.executable, "-c", SERVE, *argv], cwd=ROOT, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=errors, text=True, errors="replace")
    lines = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, process.stdout), lines.put("")], daemon=True).start()
    try:
        serving = None
        while not serving:
            line = lines.get(timeout=50)
            assert line, "llama.cpp ended before serving:\n" + log.read_text(errors="replace")[-3000:]
            serving = re.search(r"serving on (http://\S+)", line)
        answer = requests.post(serving[1] + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 16,
                                                                     "temperature": 0}, timeout=50).json()
        assert answer["timings"]["draft_n"] > 0  # the draft model drafted
        loaded = log.read_text(errors="replace")  # the context llama.cpp built
        assert "K (q8_0)" in loaded and "V (q8_0)" in loaded and re.search(r"flash_attn\s+= enabled", loaded)
    finally:
        process.stdin.close()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
