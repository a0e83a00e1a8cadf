"""The models file (service/models/models_file.py) and the one description of a model it makes (spec.py): each bad
file gives every problem as FILE:LINE: models.NAME.KEY: what; a good one gives the specs; diff() tells a reload
what to restart and what to apply live."""
from dataclasses import replace

import pytest

from service.config import ConfigError
from service.models.models_file import ModelsFileError, parse_models, read_models_file
from service.models.spec import Limits, ModelSpec, Origin, diff
from service.models.toml_lines import key_lines

# The issue's example, as users write it.
EXAMPLE = """\
[models.qwen]                                   # the model's id in /v1/models
source = "hf:Qwen/Qwen2.5-7B-Instruct-GGUF:Q4_K_M"
aliases = ["gpt-4o-mini", "qwen-chat"]
args = ["--n-gpu-layers", "99", "--flash-attn", "on", "--cache-type-k", "q8_0"]
mmproj = "auto"
draft = "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q8_0"
ctx = 16384
slots = 4
ttl = 600
pin = false
preload = true
[models.qwen.defaults]
temperature = 0.7
chat_template_kwargs = { enable_thinking = false }
[models.qwen.limits]
max_tokens = 2048
strip = ["logit_bias"]
"""


def problems(tmp_path, text) -> list:
    """The problem lines read_models_file raises for a models file holding text."""
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ModelsFileError) as raised:
        read_models_file(path)
    return list(raised.value.problems)


def test_the_issues_example_reads_as_one_spec(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(EXAMPLE)
    spec, = read_models_file(path)
    assert spec == ModelSpec(
        id="qwen", source="hf:Qwen/Qwen2.5-7B-Instruct-GGUF:Q4_K_M", aliases=("gpt-4o-mini", "qwen-chat"),
        args=("--n-gpu-layers", "99", "--flash-attn", "on", "--cache-type-k", "q8_0"), mmproj="auto",
        draft="hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q8_0", ctx=16384, slots=4, ttl=600, pin=False, preload=True,
        defaults=(("chat_template_kwargs", '{"enable_thinking": false}'), ("temperature", "0.7")),
        limits=Limits(max_tokens=2048, strip=("logit_bias",)))
    assert spec.origin == Origin(str(path), 1) and str(spec.origin) == f"{path}:1"
    assert spec.names() == ("qwen", "gpt-4o-mini", "qwen-chat")
    assert spec.default_fields() == {"temperature": 0.7, "chat_template_kwargs": {"enable_thinking": False}}


def test_each_use_of_the_defaults_gets_its_own_copy():
    spec, = parse_models(EXAMPLE, "models.toml")
    spec.default_fields()["chat_template_kwargs"]["enable_thinking"] = True
    assert spec.default_fields()["chat_template_kwargs"] == {"enable_thinking": False}


HEAD = '[models.a]\nsource = "hf:o/a"\n'  # lines 1-2 of most bad files below


@pytest.mark.parametrize("text, line, problem", [
    (HEAD + "ctx = \n", 3, "Invalid value (column 7)"),
    (HEAD + "cxt = 4096\n", 3, 'models.a.cxt: unknown key; did you mean ctx?'),
    (HEAD + "gpu_layers = 99\n", 3, "models.a.gpu_layers: unknown key; the keys are source, upstreams, aliases, "
     "args, mmproj, draft, ctx, parallel, threads, slots, embeddings, rerank, ttl, pin, preload, defaults, limits"),
    ("# two models\n\n[models.a]\nctx = 512\n", 3, "models.a: needs a source (a path or hf: spec) or upstreams "
     "(URLs of running llama-servers)"),
    (HEAD + 'aliases = ["chat", "b"]\n[models.b]\nsource = "hf:o/b"\n', 3, "models.a.aliases: b already names "
     "model b"),
    (HEAD + 'aliases = ["chat"]\n[models.b]\nsource = "hf:o/b"\naliases = ["chat"]\n', 6,
     "models.b.aliases: chat already names model a (an alias there too)"),
    (HEAD + 'aliases = ["chat", "qwen", "chat"]\n', 3, "models.a.aliases: item 3 repeats item 1"),
    (HEAD + 'upstreams = ["http://u:secret@h1:8080", "http://u:secret@h1:8080/"]\n', 3,
     "models.a.upstreams: item 2 repeats item 1"),
    ('[models.a]\nsource = ""\n', 2, "models.a.source: is empty: name a .gguf file or an hf: spec"),
    (HEAD + "ttl = -1\n", 3, "models.a.ttl: must be a number of seconds, 0 or more (0: never unloaded), not -1"),
    (HEAD + 'ctx = "4096"\n', 3, "models.a.ctx: must be a whole number, 1 or more, not '4096'"),
    (HEAD + "slots = 0\n", 3, "models.a.slots: must be a whole number, 1 or more, not 0"),
    (HEAD + 'pin = "yes"\n', 3, "models.a.pin: must be true or false, not 'yes'"),
    (HEAD + "preload = 1\n", 3, "models.a.preload: must be true or false, not 1"),
    (HEAD + "ctx = true\n", 3, "models.a.ctx: must be a whole number, 1 or more, not True"),
    (HEAD + 'args = ["--n-gpu-layers", 99]\n', 3,
     'models.a.args: item 2 is an integer, not a string (write it in quotes: "99")'),
    (HEAD + 'args = "--jinja"\n', 3, "models.a.args: must be an array of strings, not a string"),
    ('[models.a]\nupstreams = ["http://h1:8080"]\nmmproj = "auto"\n', 3,
     "models.a.mmproj: needs a source: llama-servers named in upstreams load their own"),
    ('[models.a]\nupstreams = ["http://h1:8080"]\ndraft = "hf:o/d"\n', 3,
     "models.a.draft: needs a source: llama-servers named in upstreams load their own"),
    ('[models.a]\nupstreams = ["http://h1:8080", "h2:8080"]\n', 2, "models.a.upstreams: must be an http:// or "
     "https:// URL such as http://127.0.0.1:8080, not 'h2:8080'"),
    ('[models.a]\nsource = "hf:o/a"\n[models.a.limits]\nmax_tokens = 0\n', 4,
     "models.a.limits.max_tokens: must be a whole number, 1 or more, not 0"),
    ('[models.a]\nsource = "hf:o/a"\n[models.a.limits]\nstrip = "logit_bias"\n', 4,
     "models.a.limits.strip: must be an array of strings, not a string"),
    ('[models.a]\nsource = "hf:o/a"\n[models.a.limits]\nstop = 1\n', 4,
     "models.a.limits.stop: unknown key; did you mean strip?"),
    ('[models.a]\nsource = "hf:o/a"\n[models.a.defaults]\ntemperature = 0.2\nseed = 1979-05-27\n', 5,
     "models.a.defaults.seed: is not JSON: a date, a time, nan or inf cannot reach llama.cpp"),
    ('[models.a]\nsource = "hf:o/a"\ndefaults = { top_p = nan }\n', 3,
     "models.a.defaults.top_p: is not JSON: a date, a time, nan or inf cannot reach llama.cpp"),
    ('[models.a]\nsource = "hf:o/a"\nlimits = 5\n', 3, "models.a.limits: must be a table, not an integer"),
    # Request rules are checked as routing will build them, at their line, not first when the file is applied.
    ('[models.a]\nsource = "hf:o/a"\n[models.a.limits]\nstrip = ["logit_bias", "model"]\n', 4,
     "models.a.limits.strip: 'model' cannot be set or stripped (the gateway routes by 'model' and answers as "
     "'stream' asks)"),
    ('[models.a]\nsource = "hf:o/a"\n[models.a.defaults]\ntemperature = 0.2\nstream = true\n', 5,
     "models.a.defaults.stream: 'stream' cannot be set or stripped (the gateway routes by 'model' and answers as "
     "'stream' asks)"),
    ('[models.a]\nsource = "hf:o/a"\n[models.a.defaults]\nmax_tokens = 0\n', 4,
     "models.a.defaults.max_tokens: must be a whole number of tokens, 1 or more (not 0)"),
    ('[models.a]\nsource = "hf:o/a"\ndefaults = { max_tokens = "100" }\n', 3,
     "models.a.defaults.max_tokens: must be a whole number of tokens, 1 or more (not '100')"),
    ('[models.a]\nsource = "hf:Qwen"\n', 2, "models.a.source: must be hf:OWNER/REPO, hf:OWNER/REPO:QUANT or "
     "hf:OWNER/REPO/FILE.gguf, such as hf:ggml-org/gemma-3-1b-it-GGUF, not 'hf:Qwen'"),
    ('[qwen]\nsource = "hf:o/a"\n', 1, "qwen: unknown top-level key: the file holds [models.NAME] tables only "
     "([models.qwen]?)"),
    ("# nothing yet\n", 1, "models: names no model: add a [models.NAME] table with a source or upstreams"),
    ('[models."bad name"]\nsource = "hf:o/a"\n', 1, "models.\"bad name\": bad name 'bad name': 1-128 of A-Z a-z "
     "0-9 . _ : / @ + -, starting with a letter or digit"),
    ('[models]\nqwen = { source = "hf:o/a", ctx = -5 }\n', 2, "models.qwen.ctx: must be a whole number, 1 or "
     "more, not -5"),
])
def test_a_bad_file_gives_its_one_line_with_file_and_line(tmp_path, text, line, problem):
    assert problems(tmp_path, text) == [f"{tmp_path / 'models.toml'}:{line}: {problem}"]


def test_every_problem_is_reported_at_once_in_line_order(tmp_path):
    text = ('[models.b]\nsource = "hf:o/b"\nttl = -1\n\n[models.a]\naliases = ["b"]\nctx = 0\n'
            '[models.a.limits]\nmax_tokens = "many"\n')
    file = tmp_path / "models.toml"
    assert problems(tmp_path, text) == [
        f"{file}:3: models.b.ttl: must be a number of seconds, 0 or more (0: never unloaded), not -1",
        f"{file}:5: models.a: needs a source (a path or hf: spec) or upstreams (URLs of running llama-servers)",
        f"{file}:6: models.a.aliases: b already names model b",
        f"{file}:7: models.a.ctx: must be a whole number, 1 or more, not 0",
        f"{file}:9: models.a.limits.max_tokens: must be a whole number, 1 or more, not 'many'"]


def test_the_error_is_a_config_error_with_one_line_per_problem(tmp_path):
    with pytest.raises(ConfigError) as raised:  # bin/serve stops on it with its words, no traceback
        parse_models('[models.a]\nttl = -1\n', "m.toml")
    assert str(raised.value).splitlines() == [
        "m.toml:1: models.a: needs a source (a path or hf: spec) or upstreams (URLs of running llama-servers)",
        "m.toml:2: models.a.ttl: must be a number of seconds, 0 or more (0: never unloaded), not -1"]


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(ModelsFileError) as raised:
        read_models_file(tmp_path / "nowhere.toml")
    assert raised.value.problems == (f"{tmp_path / 'nowhere.toml'}: cannot be read: No such file or directory",)


def test_relative_paths_are_from_the_models_files_folder(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "chat.gguf").write_bytes(b"GGUF")
    (tmp_path / "vision.gguf").write_bytes(b"GGUF")
    # draft is an absolute path in a literal string, where a Windows path's backslashes are no escapes.
    (tmp_path / "conf" / "models.toml").write_text('[models.chat]\nsource = "chat.gguf"\nmmproj = "../vision.gguf"\n'
                                                   f"draft = '{tmp_path / 'vision.gguf'}'\n")
    monkeypatch.chdir(tmp_path)  # not the file's folder
    spec, = read_models_file("conf/models.toml")
    assert (spec.source, spec.mmproj, spec.draft) == (str(tmp_path / "conf" / "chat.gguf"),
                                                      str(tmp_path / "vision.gguf"), str(tmp_path / "vision.gguf"))


def test_a_local_file_that_is_not_there_is_named_with_its_full_path(tmp_path):
    assert problems(tmp_path, '[models.a]\nsource = "gone.gguf"\n') == [
        f"{tmp_path / 'models.toml'}:2: models.a.source: no such file: {tmp_path / 'gone.gguf'} (relative to the "
        "models file)"]


def test_an_auto_projector_needs_an_hf_source(tmp_path):
    (tmp_path / "chat.gguf").write_bytes(b"GGUF")
    assert problems(tmp_path, '[models.a]\nsource = "chat.gguf"\nmmproj = "auto"\n') == [
        f"{tmp_path / 'models.toml'}:3: models.a.mmproj: \"auto\" takes the projector from the source's hf: repo; "
        "name its file"]


def test_a_source_and_upstreams_are_one_model_with_a_local_replica():
    spec, = parse_models('[models.a]\nsource = "hf:o/a"\nupstreams = ["http://h1:8080/"]\nmmproj = "none"\n', "m")
    assert (spec.source, spec.upstreams, spec.mmproj) == ("hf:o/a", ("http://h1:8080",), None)


def test_check_args_problems_are_placed_at_the_args_line():
    seen = []

    def check_args(args):
        seen.append(args)
        return [f"unknown flag {arg}" for arg in args if arg == "--frobnicate"]

    with pytest.raises(ModelsFileError) as raised:
        parse_models('[models.a]\nsource = "hf:o/a"\n\nargs = [\n  "--jinja",\n  "--frobnicate",\n]\n', "m.toml",
                     check_args=check_args)
    assert raised.value.problems == ("m.toml:4: models.a.args: unknown flag --frobnicate",)
    assert seen == [("--jinja", "--frobnicate")]


def test_key_lines_follow_tables_dotted_and_quoted_keys_and_skip_multiline_values():
    text = ('[models]\nqwen.ctx = 5\n[models."qwen2.5:7b"]\nargs = [\n  "--x",\n]\nnote = """\nttl = 1\n"""\n'
            "ttl = 2\n[models.'b'.limits]\nstrip = []\n")
    lines = key_lines(text)
    assert lines[("models", "qwen", "ctx")] == 2 and lines[("models", "qwen2.5:7b")] == 3
    assert lines[("models", "qwen2.5:7b", "ttl")] == 10  # not line 8, inside the string
    assert lines[("models", "b")] == 11 and lines[("models", "b", "limits", "strip")] == 12


def spec(id, **fields):
    """A spec with only what a test names."""
    return ModelSpec(id=id, source=f"hf:o/{id}", **fields)


def test_diff_says_what_is_added_removed_restarted_and_applied_live():
    old = [spec("kept"), spec("gone"), spec("restarted", ctx=4096), spec("renamed"), spec("moved")]
    new = [spec("restarted", ctx=8192), spec("kept"), spec("renamed", aliases=("chat",), ttl=0,
           limits=Limits(max_tokens=10)), replace(spec("moved"), origin=Origin("m.toml", 40)), spec("new")]
    assert diff(old, new) == ((new[4],), (old[1],), (new[0],), (new[2],), (new[1], new[3]))
    assert diff(old, new).live == (new[2],)  # named fields, in that order


@pytest.mark.parametrize("change", [{"args": ("--jinja",)}, {"source": "hf:o/other"}, {"mmproj": "auto"},
                                    {"draft": "hf:o/d"}, {"parallel": 2}, {"threads": 4}, {"embeddings": True},
                                    {"rerank": True}])
def test_a_change_to_the_command_line_restarts_the_process(change):
    old, new = spec("a"), replace(spec("a"), **change)
    assert old.identity() != new.identity() and diff([old], [new]).changed == (new,)


@pytest.mark.parametrize("change", [{"aliases": ("b",)}, {"upstreams": ("http://h:1",)}, {"ttl": 5}, {"pin": True},
                                    {"preload": True}, {"slots": 2}, {"defaults": (("seed", "1"),)},
                                    {"limits": Limits(strip=("seed",))}])
def test_names_lifecycle_and_request_rules_apply_without_a_restart(change):
    old, new = spec("a"), replace(spec("a"), **change)
    assert old.identity() == new.identity() and diff([old], [new]).live == (new,)


@pytest.mark.parametrize("before", [
    '# quote them as """ in TOML\n',
    "note = 'a\"\"\"b'  # a literal string\n",
    'note = "say \\"\\"\\" here"\n',
    "note = '''one line''' # and a ''' in a comment\n",
    'note = """two\nlines, with a "" inside and \\""" escaped"""\n',
    'note = """ends in quotes"""""\n',
])
def test_triple_quotes_in_comments_and_one_line_strings_open_no_string(before):
    text = f'[models.a]\nsource = "hf:o/a"\n{before}ctx = 5\n'
    assert key_lines(text)[("models", "a", "ctx")] == len(text.splitlines())
