"""What models there are: the environment read as a models file of one, the models file instead of it (never both),
and the file read again while the gateway runs (the reloader, its watcher and POST /models/reload)."""
import logging
import os
import threading
import time

import pytest

from service.config import ConfigError, load_settings
from service.models import hub
from service.models.catalog import models_file_path, read_models
from service.models.demo_model import DEMO_MODEL_NAME
from service.models.environment import ANY_NAME_ID, models_from_environment
from service.models.models_file import ModelsFileError
from service.models.reload import Reloader, ReloadError
from tests.clients import assert_openai_envelope


def write_gguf(path):
    """A file that starts as a GGUF does: models/ lists it (its contents are llama.cpp's to judge)."""
    path.write_bytes(b"GGUF" + bytes(28))
    return str(path)


def read_env(folder, **values):
    """The ModelSet of the environment values, with folder as MODELS_DIR."""
    return models_from_environment(load_settings(values), str(folder))


def summary(model_set) -> tuple:
    """(any_name, [(id, source's file name or None, upstreams, origin)]) of a ModelSet."""
    return model_set.any_name, [(spec.id, spec.source and os.path.basename(spec.source), spec.upstreams,
                                 str(spec.origin)) for spec in model_set.specs]


@pytest.mark.parametrize("files, env, expected", [
    ([], {}, (True, [("demo-random-tiny-llama", DEMO_MODEL_NAME, (), "demo")])),
    (["only.gguf"], {}, (True, [("only", "only.gguf", (), "models/")])),
    (["b.gguf", "a.gguf"], {}, (False, [("a", "a.gguf", (), "models/"), ("b", "b.gguf", (), "models/")])),
    # ENABLED_MODELS leaves one model chosen without names: it takes any name, as today.
    (["b.gguf", "a.gguf"], {"ENABLED_MODELS": "b"}, (True, [("b", "b.gguf", (), "models/")])),
    (["x.gguf"], {"LLAMA_MODEL": "{x}"}, (True, [("x", "x.gguf", (), "LLAMA_MODEL")])),
    # MODEL_PATHS routes by name, even one model.
    (["x.gguf"], {"MODEL_PATHS": "chat={x}"}, (False, [("chat", "x.gguf", (), "MODEL_PATHS")])),
    ([], {"MODEL_UPSTREAMS": "a=http://h:1|http://h:2,b=http://h:3"},
     (False, [("a", None, ("http://h:1", "http://h:2"), "MODEL_UPSTREAMS"), ("b", None, ("http://h:3",),
                                                                           "MODEL_UPSTREAMS")])),
    # A name in both: the local model is one more replica of the upstream one.
    (["x.gguf", "y.gguf"], {"MODEL_PATHS": "embed={y},chat={x}", "MODEL_UPSTREAMS": "chat=http://far:8080"},
     (False, [("chat", "x.gguf", ("http://far:8080",), "MODEL_PATHS"), ("embed", "y.gguf", (), "MODEL_PATHS")])),
    ([], {"LLAMA_SERVER_URL": "http://h:1"}, (True, [(ANY_NAME_ID, None, ("http://h:1",), "LLAMA_SERVER_URL")])),
    # An hf: name that names its file is named after it, and stays a spec: nothing is fetched.
    ([], {"LLAMA_MODEL": "hf:o/r/sub/model-Q8_0.gguf"},
     (True, [("model-Q8_0", "model-Q8_0.gguf", (), "LLAMA_MODEL")])),
])
def test_the_environment_as_specs(tmp_path, files, env, expected, monkeypatch):
    monkeypatch.setattr(hub, "fetch", lambda *args, **kwargs: pytest.fail("the environment's reader fetched"))
    paths = {name[:-len(".gguf")]: write_gguf(tmp_path / name) for name in files}
    values = {key: value.format(**paths) for key, value in env.items()}
    assert summary(read_env(tmp_path, **values)) == expected


@pytest.mark.skipif(os.name != "posix", reason="a backslash is a folder separator on Windows")
def test_two_files_that_come_out_with_one_name_are_served_once_with_a_warning_naming_both(tmp_path, caplog):
    # One file holds a right-to-left override; the other's name spells the escape out: both become the same name.
    first, second = write_gguf(tmp_path / "rtl-\\u202egnp.exe.gguf"), write_gguf(tmp_path / "rtl-\u202egnp.exe.gguf")
    write_gguf(tmp_path / "other.gguf")
    caplog.set_level(logging.WARNING)
    models = read_models(load_settings({"MODELS_DIR": str(tmp_path)}), default_file=str(tmp_path / "none.toml"))
    assert [(spec.id, spec.source) for spec in models.specs] == [("other", str(tmp_path / "other.gguf")),
                                                                 ("rtl-\\u202egnp.exe", first)]
    [warning] = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert repr(first) in warning and repr(second) in warning and "\u202e" not in warning


def test_model_settings_become_the_specs_own_options(tmp_path):
    values = {"MODEL_PATHS": f"chat={write_gguf(tmp_path / 'c.gguf')}", "MODEL_UPSTREAMS": "far=http://h:1",
              "MODEL_SETTINGS": "chat:ctx=512:parallel=4:threads=3:embeddings=off:rerank=on:ttl=0:preload=on:"
                                "pin=on:slots=2,far:slots=5"}
    far, chat = read_env(tmp_path, **values).specs  # MODEL_UPSTREAMS' models first, as their routes always were
    assert (chat.ctx, chat.parallel, chat.threads, chat.embeddings, chat.rerank) == (512, 4, 3, False, True)
    assert (chat.ttl, chat.preload, chat.pin, chat.slots) == (0, True, True, 2)
    assert far.id == "far" and far.slots == 5 and far.ttl is None


def test_an_hf_model_is_named_by_its_kept_file_or_else_by_its_spec_unless_a_setting_needs_the_name(tmp_path,
                                                                                                    monkeypatch):
    fetched = []
    monkeypatch.setattr(hub, "kept_copy", lambda folder, spec: None)
    monkeypatch.setattr(hub, "fetch", lambda spec, folder: fetched.append(spec) or str(tmp_path / "r-Q4_K_M.gguf"))
    spec, = read_env(tmp_path, LLAMA_MODEL="hf:o/r").specs
    assert (spec.id, spec.source, fetched) == ("hf:o/r", "hf:o/r", [])  # bin/serve --check: nothing fetched
    settings = load_settings({"LLAMA_MODEL": "hf:o/r", "MODEL_SETTINGS": "r-Q4_K_M:rerank=on"})
    spec, = models_from_environment(settings, str(tmp_path), fetch=True).specs
    assert (spec.id, spec.source, spec.rerank, fetched) == ("r-Q4_K_M", "hf:o/r", True, ["hf:o/r"])
    monkeypatch.setattr(hub, "kept_copy", lambda folder, spec: str(tmp_path / "r-Q8_0.gguf"))
    assert read_env(tmp_path, LLAMA_MODEL="hf:o/r:Q8_0").specs[0].id == "r-Q8_0"


@pytest.mark.parametrize("env, words", [
    ({"MODEL_SETTINGS": "llama:rerank=on"}, "MODEL_SETTINGS: no model named llama; the models are: "
                                            "demo-random-tiny-llama"),
    ({"MODEL_UPSTREAMS": "chat=http://h:1", "MODEL_SETTINGS": "chta:slots=2"},
     "MODEL_SETTINGS: no model named chta; the models are: chat"),
    ({"LLAMA_SERVER_URL": "http://h:1", "MODEL_SETTINGS": "x:slots=2"},
     "MODEL_SETTINGS: no model named x; the models are: none by name (LLAMA_SERVER_URL alone takes any name)"),
    ({"MODEL_UPSTREAMS": "chat=http://h:1", "ENABLED_MODELS": "chat"},
     "ENABLED_MODELS: no model named chat; the models are: none that bin/serve starts"),
    ({"ENABLED_MODELS": "nope"}, "ENABLED_MODELS: no model named nope; the models are: demo-random-tiny-llama"),
    ({"MODEL_PATHS": "a={demo}", "LLAMA_SERVER_URL": "http://h:1"}, "LLAMA_SERVER_URL: set it or MODEL_PATHS"),
])
def test_names_no_model_has_are_refused(tmp_path, env, words):
    demo = write_gguf(tmp_path / "d.gguf")
    with pytest.raises(ConfigError) as refused:
        read_env(tmp_path / "models", **{key: value.format(demo=demo) for key, value in env.items()})
    assert str(refused.value).startswith(words)


MODELS_TOML = '[models.chat]\nsource = "hf:o/r"\naliases = ["gpt-4o"]\n[models.far]\nupstreams = ["http://h:1"]\n'


def test_the_models_file_explicit_or_by_default_and_else_the_environment(tmp_path):
    default = tmp_path / "models.toml"
    assert models_file_path(load_settings({}), str(default)) is None
    assert read_models(load_settings({}), default_file=str(default)).file is None  # the environment's
    default.write_text(MODELS_TOML)
    from_file = read_models(load_settings({}), default_file=str(default))
    assert (from_file.file, from_file.any_name, [spec.id for spec in from_file.specs]) == (str(default), False,
                                                                                          ["chat", "far"])
    other = tmp_path / "other.toml"
    other.write_text('[models.solo]\nupstreams = ["http://h:2"]\n')
    explicit = read_models(load_settings({"MODELS_FILE": str(other)}), default_file=str(default))
    assert [spec.id for spec in explicit.specs] == ["solo"] and explicit.file == str(other)
    with pytest.raises(ConfigError, match=f"^MODELS_FILE: no such file: {tmp_path / 'nope.toml'}$"):
        read_models(load_settings({"MODELS_FILE": str(tmp_path / "nope.toml")}), default_file=str(default))


@pytest.mark.parametrize("env", [{"LLAMA_MODEL": "hf:o/r"}, {"MODEL_PATHS": "a=hf:o/r"}, {"MODEL_SETTINGS": "a:pin=on"},
                                 {"ENABLED_MODELS": "a"}, {"MODEL_UPSTREAMS": "a=http://h:1"},
                                 {"LLAMA_SERVER_URL": "http://h:1"}])
def test_a_models_file_beside_a_setting_that_names_models_is_refused_naming_both(tmp_path, env):
    default = tmp_path / "models.toml"
    default.write_text(MODELS_TOML)
    with pytest.raises(ConfigError) as refused:
        read_models(load_settings(env), default_file=str(default))
    name, = env
    assert str(refused.value) == (f"{name}: set, and the models file {default} names the models too: keep one "
                                  f"(unset {name}, or move the file away)")
    # The LLAMA_* process settings stay every model's defaults: no refusal for them.
    assert read_models(load_settings({"LLAMA_CTX": "8192", "MODEL_IDLE_TTL_S": "60"}), default_file=str(default))


def test_the_models_files_args_are_judged_by_check_args(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text('[models.chat]\nsource = "hf:o/r"\nargs = ["--bogus"]\n')
    with pytest.raises(ModelsFileError) as refused:
        read_models(load_settings({"MODELS_FILE": str(path)}), check_args=lambda args: [f"no {args[0]}"])
    assert refused.value.problems == (f"{path}:3: models.chat.args: no --bogus",)


# -- read again while the gateway runs ----------------------------------------------------------------------------

class Applied:
    """A fleet's apply: records each ModelSet and answers as the fleet does."""

    def __init__(self):
        self.sets = []
        self.event = threading.Event()

    def __call__(self, model_set):
        self.sets.append(model_set)
        self.event.set()
        return {"added": [spec.id for spec in model_set.specs], "removed": [], "changed": [], "updated": []}


def test_a_reload_applies_the_file_and_a_broken_one_changes_nothing_with_a_line_per_problem(tmp_path, caplog):
    path = tmp_path / "models.toml"
    path.write_text(MODELS_TOML)
    apply = Applied()
    reloader = Reloader(str(path), apply)
    assert reloader.reload("admin")["added"] == ["chat", "far"]
    assert apply.sets[0].file == str(path) and not apply.sets[0].any_name
    path.write_text('[models.chat]\nsource = "hf:o/r"\nttl = -1\ncontex = 5\n')
    with caplog.at_level(logging.INFO, logger="service.models.reload"), pytest.raises(ReloadError) as refused:
        reloader.reload("admin")
    assert refused.value.problems == (f"{path}:3: models.chat.ttl: must be a number of seconds, 0 or more (0: never "
                                      "unloaded), not -1", f"{path}:4: models.chat.contex: unknown key; did you mean "
                                      "ctx?") and not refused.value.unavailable
    assert len(apply.sets) == 1  # nothing applied
    lines = [(record.getMessage(), record.fields) for record in caplog.records]
    assert lines[:2] == [("models file problem", {"problem": problem}) for problem in refused.value.problems]
    assert lines[2][0] == "models reload refused: the running models stay" and lines[2][1]["problems"] == 2


def test_the_watcher_applies_a_burst_of_writes_once_when_the_file_is_still(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(MODELS_TOML)
    apply = Applied()
    reloader = Reloader(str(path), apply, poll_s=0.05, settle_s=0.3).watch()
    try:
        time.sleep(0.2)
        assert apply.sets == []  # the file as read at start is no change
        for size in range(1, 6):  # an editor writing in steps, faster than the file settles
            path.write_text(MODELS_TOML + "# x" * size + "\n")
            time.sleep(0.1)
        assert apply.event.wait(5)
        time.sleep(0.5)
        assert len(apply.sets) == 1 and [spec.id for spec in apply.sets[0].specs] == ["chat", "far"]
    finally:
        reloader.stop()


@pytest.fixture
def admin_app(make_app):
    """An app with the admin key whose reloader (if given) reads path; returns a client's POST."""

    def build(reloader):
        app = make_app("http://127.0.0.1:9", ADMIN_API_KEY="sk-admin", OPENAI_API_KEY="sk-client")
        app.extensions["reloader"] = reloader
        client = app.test_client()
        return lambda key="sk-admin": client.post("/models/reload", headers={"Authorization": f"Bearer {key}"})
    return build


def test_post_models_reload_answers_the_changes_or_the_problems_for_the_admin_key_alone(tmp_path, admin_app):
    path = tmp_path / "models.toml"
    path.write_text(MODELS_TOML)
    post = admin_app(Reloader(str(path), Applied()))
    assert post("sk-client").status_code == 403 and post("nothing").status_code == 401
    answer = post()
    assert answer.status_code == 200 and answer.get_json() == {"added": ["chat", "far"], "removed": [], "changed": [],
                                                               "updated": []}
    path.write_text("[models.chat\n")
    error = assert_openai_envelope(post(), 400)
    assert (error["type"], error["code"]) == ("invalid_request_error", "models_file_invalid")
    assert error["message"].startswith(f"{path}:1: ")


def test_post_models_reload_without_a_models_file_says_so(admin_app):
    answer = admin_app(None)()
    assert answer.status_code == 409 and answer.get_json()["error"]["code"] == "no_models_file"
    assert "the models come from the environment" in answer.get_json()["error"]["message"]
