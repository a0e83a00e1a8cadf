"""What a model spec becomes (its files, its llama.cpp command line, its pool settings), and the fleet: the local
models of a ModelSet in a pool, and the change to another ModelSet while the gateway runs."""
import os

import pytest

from service.config import ConfigError, load_settings
from service.llama import launch
from service.llama.fleet import Fleet
from service.llama.launch import ModelFiles, lifecycle, pooled_model, resolve_files, supervisor_for
from service.llama.pooled_model import PooledModel
from service.models.errors import LlamaStartError
from service.models.models_file import ModelsFileError
from service.models.spec import Limits, ModelSet, ModelSpec
from service.proxy.routing import Router
from tests.fakes import FakeSupervisor


def gguf_file(path, *, pooling=False, context=4096):
    """A GGUF that holds only the metadata the fleet reads."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(context)
    if pooling:
        writer.add_pooling_type(gguf.PoolingType.CLS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def settings(**values):
    """Every setting, with values given as the environment would."""
    return load_settings(values)


def flag_value(supervisor, name):
    """The value after flag name on a supervisor's command line (None without the flag)."""
    return supervisor.flags[supervisor.flags.index(name) + 1] if name in supervisor.flags else None


# -- one spec, one llama.cpp ---------------------------------------------------------------------------------------

def test_each_model_gets_flags_from_its_file_and_its_own_settings(tmp_path):
    embed = ModelSpec("embed", source=gguf_file(tmp_path / "e.gguf", pooling=True, context=512))
    chat = ModelSpec("chat", source=gguf_file(tmp_path / "c.gguf"), parallel=4, threads=3)
    values = settings(LLAMA_CTX="8192", LLAMA_EMBEDDINGS="0")
    embedder = supervisor_for(embed, values, alias="embed")
    assert "--embeddings" in embedder.flags and "--pooling" not in embedder.flags  # the model's own pooling
    assert flag_value(embedder, "--ctx-size") == "512"  # never past what it was trained for
    assert flag_value(embedder, "--alias") == "embed"
    chatter = supervisor_for(chat, values)
    assert "--embeddings" not in chatter.flags
    assert (flag_value(chatter, "--ctx-size"), flag_value(chatter, "--parallel"), flag_value(chatter, "--threads")) \
        == ("4096", "4", "3")
    # Its own ctx too is capped to what it was trained for; below that it is taken as it is.
    assert flag_value(supervisor_for(ModelSpec("chat", source=chat.source, ctx=65536), values), "--ctx-size") == "4096"
    assert flag_value(supervisor_for(ModelSpec("chat", source=chat.source, ctx=1024), values), "--ctx-size") == "1024"


def test_a_specs_args_then_its_projector_and_draft_end_its_command_line(tmp_path):
    spec = ModelSpec("vision", source=gguf_file(tmp_path / "m.gguf"), args=("-ngl", "99", "--flash-attn", "on"),
                     mmproj=str(tmp_path / "mmproj-F16.gguf"), draft=str(tmp_path / "draft.gguf"))
    files = ModelFiles(spec.source, spec.mmproj, spec.draft)
    command = supervisor_for(spec, settings(), files, alias="vision").command()
    gateway_end = command.index("--pooling") + 2  # the gateway's own flags come first, embeddings last
    assert command[gateway_end:gateway_end + 8] == ["-ngl", "99", "--flash-attn", "on", "--mmproj", spec.mmproj,
                                                    "--model-draft", spec.draft]
    assert command[command.index("--model") + 1] == spec.source


def test_hf_files_are_fetched_and_a_local_projector_taken_as_it_is(tmp_path, monkeypatch):
    fetched = []
    monkeypatch.setattr(launch, "resolve", lambda name, folder: fetched.append(name) or f"{folder}/{name[3:]}.gguf")
    monkeypatch.setattr(launch, "fetch_projector", lambda source, folder, choice: f"{folder}/projector-of-{choice}")
    spec = ModelSpec("m", source="hf:o/r:Q4_K_M", mmproj="auto", draft="hf:o/small:Q8_0")
    assert resolve_files(spec, "/models") == ModelFiles("/models/o/r:Q4_K_M.gguf", "/models/projector-of-auto",
                                                        "/models/o/small:Q8_0.gguf")
    assert fetched == ["hf:o/r:Q4_K_M", "hf:o/small:Q8_0"]
    local = ModelSpec("m", source="hf:o/r", mmproj="/p/mmproj.gguf")
    assert resolve_files(local, "/models").mmproj == "/p/mmproj.gguf"
    assert resolve_files(ModelSpec("m", source="hf:o/r", mmproj="none"), "/models").mmproj is None
    assert resolve_files(ModelSpec("m", source="hf:o/r"), "/models") == ModelFiles("/models/o/r.gguf")


@pytest.mark.parametrize("embeddings", ["1", "0"])
def test_rerank_on_starts_llama_cpp_with_rank_pooling(tmp_path, embeddings):
    values = settings(LLAMA_EMBEDDINGS=embeddings)
    flags = supervisor_for(ModelSpec("x", source=gguf_file(tmp_path / "x.gguf"), rerank=True), values).flags
    assert flags[flags.index("--embeddings"):][:3] == ["--embeddings", "--pooling", "rank"]
    chat = ModelSpec("y", source=gguf_file(tmp_path / "y.gguf"))
    assert flag_value(supervisor_for(chat, values), "--pooling") == ("mean" if embeddings == "1" else None)


def test_rerank_on_overrides_an_embedding_models_own_pooling(tmp_path):
    embed = ModelSpec("e", source=gguf_file(tmp_path / "e.gguf", pooling=True), rerank=True)
    assert flag_value(supervisor_for(embed, settings()), "--pooling") == "rank"


def test_a_models_own_embeddings_switch_wins_over_llama_embeddings(tmp_path):
    path = gguf_file(tmp_path / "c.gguf")
    assert "--embeddings" in supervisor_for(ModelSpec("c", source=path, embeddings=True),
                                            settings(LLAMA_EMBEDDINGS="0")).flags
    assert "--embeddings" not in supervisor_for(ModelSpec("c", source=path, embeddings=False), settings()).flags


def test_child_maps_pooling_rank_to_xllamacpps_rank_and_leaves_the_models_own_without_it():
    import xllamacpp

    from service.llama import child

    def params(*flags):
        return child.server_params(["--model", "m.gguf", "--port", "1", *flags])

    pooling = xllamacpp.llama_pooling_type
    ranking = params("--embeddings", "--pooling", "rank")
    assert ranking.embedding and ranking.pooling_type == pooling.LLAMA_POOLING_TYPE_RANK
    assert params("--embeddings", "--pooling", "mean").pooling_type == pooling.LLAMA_POOLING_TYPE_MEAN
    own = params("--embeddings")
    # Unspecified: llama.cpp takes the pooling the GGUF names (a reranker's rank, an embedder's cls or mean).
    assert own.embedding and own.pooling_type == pooling.LLAMA_POOLING_TYPE_UNSPECIFIED
    assert not params().embedding


def test_pool_settings_per_model_and_the_memory_need_counts_the_prompt_cache_and_the_draft(demo_model_path):
    from service.models.model_memory import estimate_mib

    values = settings(MODELS_MEMORY_MIB="4000", LLAMA_CACHE_RAM_MIB="256", MODEL_IDLE_TTL_S="60")
    spec = ModelSpec("m", source=demo_model_path, ttl=5, pin=True, preload=True, slots=3, ctx=1024)
    supervisor = supervisor_for(spec, values)
    command = supervisor.command()
    assert command[command.index("--cache-ram") + 1] == "256"
    assert not {"--ttl", "--pin", "--preload", "--slots"} & set(command)  # the gateway's own, not llama.cpp's
    pooled = pooled_model(spec, supervisor, values)
    assert (pooled.ttl_s, pooled.pinned, pooled.preload) == (5, True, True)
    assert pooled.need_mib == pytest.approx(estimate_mib(demo_model_path, 1024) + 256)
    drafted = pooled_model(spec, supervisor, values, ModelFiles(demo_model_path, None, demo_model_path))
    assert drafted.need_mib == pytest.approx(2 * estimate_mib(demo_model_path, 1024) + 256)  # its draft's share
    plain = settings(MODELS_MEMORY_MIB="4000", MODEL_IDLE_TTL_S="60")
    other_spec = ModelSpec("o", source=demo_model_path)
    other = pooled_model(other_spec, supervisor_for(other_spec, plain), plain)
    assert other.ttl_s == 60 and other.need_mib > 8192  # llama.cpp's own prompt cache default is counted


def test_a_models_own_ttl_0_means_never_whatever_model_idle_ttl_s_says():
    values = settings(MODEL_IDLE_TTL_S="60")
    ttls = {name: lifecycle(ModelSpec(name, source="/m.gguf", ttl=ttl), values)["ttl_s"]
            for name, ttl in (("kept", 0), ("brief", 5), ("plain", None))}
    # 0 is a setting of its own (never unload), not "unset": it must not fall back to the global TTL.
    assert ttls == {"kept": 0, "brief": 5, "plain": 60}


# -- the fleet -----------------------------------------------------------------------------------------------------

def test_one_local_model_gets_llama_port_and_a_model_of_any_name_is_named_by_its_file(tmp_path):
    path = gguf_file(tmp_path / "only.gguf")
    values = settings(LLAMA_PORT="18123")
    # An hf: name not kept yet is named by its spec until its file is known: then by the file, as it always was.
    anyone = Fleet(ModelSet((ModelSpec("hf:o/only", source=path),), any_name=True), values, str(tmp_path))
    assert anyone.local_urls == {"hf:o/only": "http://127.0.0.1:18123"}
    assert flag_value(anyone.supervisors["hf:o/only"], "--alias") == "only" and list(anyone.pool.models) == ["only"]
    named = Fleet(ModelSet((ModelSpec("chat", source=path), ModelSpec("far", upstreams=("http://far:8080",)))),
                  values, str(tmp_path))
    assert list(named.supervisors) == ["chat"] and flag_value(named.supervisors["chat"], "--alias") == "chat"
    two = Fleet(ModelSet((ModelSpec("a", source=path), ModelSpec("b", source=path))), values, str(tmp_path))
    ports = {supervisor.port for supervisor in two.supervisors.values()}
    assert len(ports) == 2 and 18123 not in ports  # LLAMA_PORT holds for one model; several get free ports


class FakeLaunch:
    """Fleet's launch: a PooledModel on a FakeSupervisor, each new one on a port of its own."""

    def __init__(self):
        self.next_port = 9000
        self.launched = []  # (id, port)
        self.fail = None
        self.at_reload = False

    def __call__(self, spec, port=None, loadable=False):
        assert loadable == self.at_reload, "a reload checks the files llama.cpp loads; a start leaves them to it"
        if self.fail:
            raise LlamaStartError(self.fail)
        if port is None:
            self.next_port += 1
            port = self.next_port
        supervisor = FakeSupervisor(f"http://127.0.0.1:{port}")
        supervisor.port, supervisor.port_chosen, supervisor.spec = port, True, spec
        self.launched.append((spec.id, port))
        return PooledModel(spec.id, supervisor, **lifecycle(spec, SETTINGS))


SETTINGS = settings(MODEL_IDLE_TTL_S="30")


class WatchedRouter(Router):
    """A Router that checks, at each change, that the pool knows every local URL it routes to, and records the
    routed ids."""

    def __init__(self, pool):
        super().__init__([])
        self.pool, self.seen = pool, []

    def apply(self, model_set, local_urls=None):
        unknown = [url for url in (local_urls or {}).values() if url not in self.pool.by_url]
        assert not unknown, f"routed before the pool knew them: {unknown}"
        changes = super().apply(model_set, local_urls)
        self.seen.append(sorted(self.routes))
        return changes


def fleet_and_router(*specs):
    fake = FakeLaunch()
    fleet = Fleet(ModelSet(specs, file="models.toml"), SETTINGS, "/models", launch=fake)
    fake.at_reload = True
    router = WatchedRouter(fleet.pool)
    router.apply(fleet.model_set, fleet.local_urls)
    return fleet, router, fake


def test_apply_adds_removes_restarts_and_updates_each_through_the_pool_and_the_routes(monkeypatch):
    fleet, router, fake = fleet_and_router(ModelSpec("keep", source="/k.gguf"), ModelSpec("gone", source="/g.gguf"),
                                           ModelSpec("tune", source="/t.gguf"),
                                           ModelSpec("far", upstreams=("http://f",)))
    retired = []
    real_retire = fleet.pool.retire

    def retire(name):
        assert name not in router.routes  # its route went first: no new request can name it
        retired.append(name)
        real_retire(name)
    monkeypatch.setattr(fleet.pool, "retire", retire)
    old_keep_port = fleet.supervisors["keep"].port
    new = ModelSet((ModelSpec("keep", source="/k.gguf", args=("-fa", "on")), ModelSpec("tune", source="/t.gguf",
                                                                                      ttl=5, pin=True),
                    ModelSpec("far", upstreams=("http://f",)), ModelSpec("new", source="/n.gguf", aliases=("n",))),
                   file="models.toml")
    changes = fleet.apply(new, router)
    assert changes == {"added": ["new"], "removed": ["gone"], "changed": ["keep"], "updated": ["tune"]}
    assert retired == ["gone"] and "gone" not in fleet.pool.models and "gone" not in fleet.supervisors
    # Changed: a new supervisor on the same port, which the pool takes (it was unloaded: at once).
    assert fleet.supervisors["keep"].port == old_keep_port and fleet.supervisors["keep"].spec.args == ("-fa", "on")
    assert fleet.pool.models["keep"].supervisor is fleet.supervisors["keep"]
    assert (fleet.pool.models["tune"].ttl_s, fleet.pool.models["tune"].pinned) == (5, True)  # in place
    new_port = fleet.supervisors["new"].port
    assert fake.launched[3:] == [("new", new_port), ("keep", old_keep_port)]  # nothing else launched again
    assert fleet.supervisors["new"].port_chosen and new_port not in {old_keep_port, fleet.supervisors["tune"].port}
    assert router.route("n") is router.route("new")
    assert router.route("new").replicas[0].url == f"http://127.0.0.1:{new_port}"
    assert fleet.model_set is new and set(fleet.local_urls) == {"keep", "tune", "new"}


def test_a_model_that_moves_between_here_and_upstreams_joins_or_leaves_the_pool():
    fleet, router, _ = fleet_and_router(ModelSpec("a", source="/a.gguf"), ModelSpec("b", upstreams=("http://b",)))
    changes = fleet.apply(ModelSet((ModelSpec("a", upstreams=("http://a",)), ModelSpec("b", source="/b.gguf")),
                                   file="models.toml"), router)
    assert changes["changed"] == ["a", "b"]
    assert set(fleet.pool.models) == {"b"} and set(fleet.supervisors) == {"b"}
    assert [replica.url for replica in router.route("a").replicas] == ["http://a"]
    assert [replica.url for replica in router.route("b").replicas] == [fleet.supervisors["b"].url]


def test_a_set_that_cannot_be_applied_changes_nothing():
    fleet, router, fake = fleet_and_router(ModelSpec("a", source="/a.gguf"))
    before = (fleet.model_set, dict(fleet.supervisors), set(fleet.pool.models), router.routes)
    fake.fail = "hf:o/r: no such repo"
    with pytest.raises(LlamaStartError):
        fleet.apply(ModelSet((ModelSpec("a", source="/a.gguf"), ModelSpec("b", source="hf:o/r")),
                             file="models.toml"), router)
    assert (fleet.model_set, fleet.supervisors, set(fleet.pool.models), router.routes) == before
    fake.fail = None
    # The routes refuse it (a default on the gateway's own field): the model the pool had taken in is let go.
    refused = ModelSpec("b", source="/b.gguf", defaults=(("model", '"x"'),))
    with pytest.raises(ConfigError, match="models.b"):
        fleet.apply(ModelSet((ModelSpec("a", source="/a.gguf"), refused), file="models.toml"), router)
    assert (fleet.model_set, fleet.supervisors, set(fleet.pool.models), router.routes) == before


def test_an_unchanged_set_changes_nothing():
    fleet, router, fake = fleet_and_router(ModelSpec("a", source="/a.gguf", limits=Limits(max_tokens=5)))
    launched = list(fake.launched)
    same = ModelSet((ModelSpec("a", source="/a.gguf", limits=Limits(max_tokens=5)),), file="models.toml")
    assert fleet.apply(same, router) == {"added": [], "removed": [], "changed": [], "updated": []}
    assert fake.launched == launched and os.path.basename(fleet.model_set.file) == "models.toml"


# -- what a reload refuses before anything changes -----------------------------------------------------------------

def real_fleet(tmp_path, **sources):
    """A Fleet making real supervisors (never started) of a models file's specs (name -> source), and its routes."""
    specs = tuple(ModelSpec(name, source=source) for name, source in sources.items())
    fleet = Fleet(ModelSet(specs, file="models.toml"), settings(), str(tmp_path))
    router = Router([])
    router.apply(fleet.model_set, fleet.local_urls)
    return fleet, router


@pytest.mark.parametrize("key", ["source", "mmproj", "draft"])
def test_a_reload_refuses_a_models_file_that_is_not_gguf_and_the_running_model_stays(tmp_path, key):
    model = gguf_file(tmp_path / "m.gguf")
    fleet, router = real_fleet(tmp_path, m=model)
    before = (fleet.model_set, dict(fleet.supervisors), dict(fleet.pool.models), router.routes)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    files = {"source": model, key: str(notes)}
    with pytest.raises(ModelsFileError) as refused:
        fleet.apply(ModelSet((ModelSpec("m", **files),), file="models.toml"), router)
    assert refused.value.problems == (f"environment: models.m.{key}: {notes} is not a GGUF file, which llama.cpp "
                                      "cannot load",)
    assert (fleet.model_set, fleet.supervisors, fleet.pool.models, router.routes) == before
    # A new model is checked as a changed one is; good files pass.
    with pytest.raises(ModelsFileError, match=r"models\.n\.source: .*notes\.txt is not a GGUF file"):
        fleet.apply(ModelSet((ModelSpec("m", source=model), ModelSpec("n", source=str(notes))), file="models.toml"),
                    router)
    assert set(fleet.supervisors) == {"m"}
    good = {"source": model, key: gguf_file(tmp_path / "mmproj-other.gguf")}
    assert fleet.apply(ModelSet((ModelSpec("m", **good),), file="models.toml"), router)["changed"] == ["m"]


def test_a_new_models_port_is_none_of_the_fleets_even_of_a_model_not_loaded(tmp_path, monkeypatch):
    from service.llama import supervisor as supervisors

    fleet, router = real_fleet(tmp_path, a=gguf_file(tmp_path / "a.gguf"), b=gguf_file(tmp_path / "b.gguf"))
    ports = [supervisor.port for supervisor in fleet.supervisors.values()]
    real_free_port = supervisors.free_port
    offered = iter(ports)  # the OS offers the ports of models that hold no socket (not loaded) first
    monkeypatch.setattr(supervisors, "free_port", lambda host="127.0.0.1": next(offered, None) or real_free_port())
    new = ModelSet((*fleet.model_set.specs, ModelSpec("c", source=gguf_file(tmp_path / "c.gguf"))), file="models.toml")
    assert fleet.apply(new, router)["added"] == ["c"]
    assert fleet.supervisors["c"].port not in ports and fleet.supervisors["c"].port_chosen
    assert [replica.url for replica in router.route("c").replicas] == [fleet.supervisors["c"].url]


def test_a_new_models_port_is_not_a_retiring_ones(monkeypatch):
    from service.llama import supervisor as supervisors

    fleet, router, _ = fleet_and_router(ModelSpec("a", source="/a.gguf"), ModelSpec("b", source="/b.gguf"))
    fleet.start()
    try:
        hold = fleet.pool.claim(router.route("b"))
        hold.wait()
        retiring = fleet.supervisors["b"].port
        fleet.apply(ModelSet((ModelSpec("a", source="/a.gguf"),), file="models.toml"), router)
        assert "b" not in fleet.supervisors and fleet.pool.by_url[f"http://127.0.0.1:{retiring}"].removed  # draining
        real_free_port = supervisors.free_port
        offered = iter([retiring])
        monkeypatch.setattr(supervisors, "free_port", lambda host="127.0.0.1": next(offered, None) or real_free_port())
        fleet.apply(ModelSet((ModelSpec("a", source="/a.gguf"), ModelSpec("c", source="/c.gguf")),
                             file="models.toml"), router)
        # Its llama.cpp runs on until its requests end: a new one there could not listen.
        assert fleet.supervisors["c"].port != retiring
        hold.release()
    finally:
        fleet.stop()
