"""Which local models bin/serve starts, with which llama.cpp flags, and how requests are routed to them."""
import os

import pytest

from service.config import ConfigError, load_settings
from service.llama.fleet import Fleet, LocalModel, local_models, supervisor_for
from service.models.demo_model import DEMO_MODEL_NAME


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


def test_every_gguf_in_models_is_a_model_named_after_its_file(tmp_path):
    for name in ("b-chat.gguf", "a-embed.gguf"):
        gguf_file(tmp_path / name)
    for name in (DEMO_MODEL_NAME, "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    models = local_models(settings(), str(tmp_path))
    assert [(m.name, m.source) for m in models] == [("a-embed", "models/"), ("b-chat", "models/")]
    enabled = local_models(settings(ENABLED_MODELS="b-chat"), str(tmp_path))
    assert [m.name for m in enabled] == ["b-chat"]
    with pytest.raises(ConfigError, match="no model named c; the models are: a-embed, b-chat"):
        local_models(settings(ENABLED_MODELS="c"), str(tmp_path))


def test_the_demo_model_when_models_is_empty_and_nothing_with_only_upstreams(tmp_path):
    demo, = local_models(settings(), str(tmp_path))
    assert demo.is_demo and demo.source == "demo" and os.path.isfile(demo.path)
    assert local_models(settings(MODEL_UPSTREAMS="a=http://h:1"), str(tmp_path)) == []
    assert local_models(settings(LLAMA_SERVER_URL="http://h:1"), str(tmp_path)) == []


def test_model_paths_win_and_may_add_a_replica_to_an_upstream(tmp_path):
    path = gguf_file(tmp_path / "x.gguf")
    values = settings(MODEL_PATHS=f"chat={path}", MODEL_UPSTREAMS="chat=http://far:8080,embed=http://far:8081")
    models = local_models(values, str(tmp_path))
    assert models == [LocalModel("chat", path, "MODEL_PATHS")]
    fleet = Fleet(models, values)
    routes = fleet.route_settings(values)["MODEL_UPSTREAMS"]
    assert routes == {"chat": ("http://far:8080", fleet.supervisors[0].url), "embed": ("http://far:8081",)}


def test_one_model_found_by_itself_takes_any_model_name(tmp_path):
    path = gguf_file(tmp_path / "only.gguf")
    values = settings(LLAMA_MODEL=path)
    fleet = Fleet(local_models(values, str(tmp_path)), values)
    assert fleet.route_settings(values) == {"LLAMA_SERVER_URL": fleet.supervisors[0].url}


def test_each_model_gets_flags_from_its_file_and_its_own_settings(tmp_path):
    embed = LocalModel("embed", gguf_file(tmp_path / "e.gguf", pooling=True, context=512), "MODEL_PATHS")
    chat = LocalModel("chat", gguf_file(tmp_path / "c.gguf"), "MODEL_PATHS")
    values = settings(LLAMA_CTX="8192", LLAMA_EMBEDDINGS="0", MODEL_SETTINGS="chat:parallel=4:threads=3")

    def flag(supervisor, name):
        return supervisor.flags[supervisor.flags.index(name) + 1] if name in supervisor.flags else None

    embedder = supervisor_for(embed, values)
    assert "--embeddings" in embedder.flags and "--pooling" not in embedder.flags  # the model's own pooling
    assert flag(embedder, "--ctx-size") == "512"  # never past what it was trained for
    assert flag(embedder, "--alias") == "embed"
    chatter = supervisor_for(chat, values)
    assert "--embeddings" not in chatter.flags
    assert (flag(chatter, "--ctx-size"), flag(chatter, "--parallel"), flag(chatter, "--threads")) == ("4096", "4", "3")


def flag_value(supervisor, name):
    """The value after flag name on a supervisor's command line (None without the flag)."""
    return supervisor.flags[supervisor.flags.index(name) + 1] if name in supervisor.flags else None


@pytest.mark.parametrize("embeddings", ["1", "0"])
def test_rerank_on_starts_llama_cpp_with_rank_pooling(tmp_path, embeddings):
    ranker = LocalModel("x", gguf_file(tmp_path / "x.gguf"), "MODEL_PATHS")
    chat = LocalModel("y", gguf_file(tmp_path / "y.gguf"), "MODEL_PATHS")
    values = settings(LLAMA_EMBEDDINGS=embeddings, MODEL_SETTINGS="x:rerank=on,y:rerank=off")
    flags = supervisor_for(ranker, values).flags
    assert flags[flags.index("--embeddings"):][:3] == ["--embeddings", "--pooling", "rank"]
    assert flag_value(supervisor_for(chat, values), "--pooling") == ("mean" if embeddings == "1" else None)


def test_rerank_on_overrides_an_embedding_models_own_pooling(tmp_path):
    embed = LocalModel("e", gguf_file(tmp_path / "e.gguf", pooling=True), "MODEL_PATHS")
    assert flag_value(supervisor_for(embed, settings(MODEL_SETTINGS="e:rerank=on")), "--pooling") == "rank"


def child_params(*flags):
    """The xllamacpp CommonParams the child process builds from llama-server flags."""
    from service.llama import child

    return child.server_params(child.parse_args(["--model", "m.gguf", "--port", "1", *flags]))


def test_child_maps_pooling_rank_to_xllamacpps_rank_and_leaves_the_models_own_without_it():
    import xllamacpp

    pooling = xllamacpp.llama_pooling_type
    ranking = child_params("--embeddings", "--pooling", "rank")
    assert ranking.embedding and ranking.pooling_type == pooling.LLAMA_POOLING_TYPE_RANK
    assert child_params("--embeddings", "--pooling", "mean").pooling_type == pooling.LLAMA_POOLING_TYPE_MEAN
    own = child_params("--embeddings")
    # Unspecified: llama.cpp takes the pooling the GGUF names (a reranker's rank, an embedder's cls or mean).
    assert own.embedding and own.pooling_type == pooling.LLAMA_POOLING_TYPE_UNSPECIFIED
    assert not child_params().embedding


def test_pool_settings_per_model_and_the_memory_need_counts_the_prompt_cache(demo_model_path):
    from service.llama.fleet import pooled_model
    from service.models.model_memory import estimate_mib

    values = settings(MODELS_MEMORY_MIB="4000", LLAMA_CACHE_RAM_MIB="256", MODEL_IDLE_TTL_S="60",
                      MODEL_SETTINGS="m:ttl=5:pin=on:preload=on:slots=3:ctx=1024")
    model = LocalModel("m", demo_model_path, "MODEL_PATHS")
    supervisor = supervisor_for(model, values)
    command = supervisor.command()
    assert command[command.index("--cache-ram") + 1] == "256"
    assert not {"--ttl", "--pin", "--preload", "--slots"} & set(command)  # the gateway's own, not llama.cpp's
    pooled = pooled_model(model, supervisor, values)
    assert (pooled.ttl_s, pooled.pinned, pooled.preload) == (5, True, True)
    assert pooled.need_mib == pytest.approx(estimate_mib(demo_model_path, 1024) + 256)
    plain = settings(MODELS_MEMORY_MIB="4000", MODEL_IDLE_TTL_S="60")
    other_model = LocalModel("o", demo_model_path, "MODEL_PATHS")
    other = pooled_model(other_model, supervisor_for(other_model, plain), plain)
    assert other.ttl_s == 60 and other.need_mib > 8192  # llama.cpp's own prompt cache default is counted


def test_a_models_own_ttl_0_means_never_whatever_model_idle_ttl_s_says(tmp_path):
    from service.llama.fleet import pooled_model

    values = settings(MODEL_IDLE_TTL_S="60", MODEL_SETTINGS="kept:ttl=0,brief:ttl=5")
    ttls = {}
    for name in ("kept", "brief", "plain"):
        model = LocalModel(name, gguf_file(tmp_path / f"{name}.gguf"), "MODEL_PATHS")
        ttls[name] = pooled_model(model, supervisor_for(model, values), values).ttl_s
    # 0 is a setting of its own (never unload), not "unset": it must not fall back to the global TTL.
    assert ttls == {"kept": 0, "brief": 5, "plain": 60}
