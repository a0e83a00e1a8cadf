"""A reload of the models file against a real fleet (never started): what it refuses, with the running models kept,
and the trigger that finds a reload under way, which is answered at once instead of queued."""
import json
import logging
import threading
from functools import partial

import pytest

from service.config import load_settings
from service.llama import launch
from service.llama.fleet import Fleet
from service.models.catalog import models_of_file
from service.models.reload import Reloader, ReloadError
from service.proxy.routing import Router
from tests.clients import assert_openai_envelope


def gguf_file(path):
    """A GGUF that holds only the metadata the fleet reads."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(4096)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def write_models(path, **sources):
    """A models file of the given models (name -> source)."""
    path.write_text("".join(f"[models.{name}]\nsource = {json.dumps(source)}\n\n" for name, source in sources.items()))


@pytest.fixture
def served(tmp_path):
    """(fleet, reloader) of models.toml in tmp_path, which serves m from m.gguf; the fleet is never started."""
    path = tmp_path / "models.toml"
    write_models(path, m=gguf_file(tmp_path / "m.gguf"))
    fleet = Fleet(models_of_file(str(path)), load_settings({}), str(tmp_path))
    router = Router([])
    router.apply(fleet.model_set, fleet.local_urls)
    return fleet, Reloader(str(path), partial(fleet.apply, router=router))


@pytest.fixture
def post(make_app):
    """post(reloader): POST /models/reload with the admin key on an app whose reloader it is."""

    def send(reloader):
        app = make_app("http://127.0.0.1:9", ADMIN_API_KEY="sk-admin")
        app.extensions["reloader"] = reloader
        return app.test_client().post("/models/reload", headers={"Authorization": "Bearer sk-admin"})
    return send


def test_a_source_that_is_not_gguf_is_refused_with_its_line_and_the_running_model_stays(tmp_path, served, post):
    fleet, reloader = served
    before = (fleet.model_set, dict(fleet.supervisors), dict(fleet.pool.models))
    notes = tmp_path / "notes.txt"
    notes.write_text("a file that is no model")
    write_models(tmp_path / "models.toml", m=str(notes))
    error = assert_openai_envelope(post(reloader), 400)
    assert error["code"] == "models_file_invalid"
    assert error["message"] == (f"{tmp_path / 'models.toml'}:1: models.m.source: {notes} is not a GGUF file, which "
                                "llama.cpp cannot load")
    assert (fleet.model_set, fleet.supervisors, fleet.pool.models) == before  # its llama.cpp is not stopped


def test_a_reload_under_way_is_not_waited_for_by_a_post_nor_a_sighup(tmp_path, served, post, monkeypatch, caplog):
    fleet, reloader = served
    fetching, go_on = threading.Event(), threading.Event()
    real_resolve = launch.resolve

    def slow_fetch(name, folder):
        if not name.startswith("hf:"):
            return real_resolve(name, folder)
        fetching.set()
        assert go_on.wait(10)
        return gguf_file(tmp_path / "fetched.gguf")
    monkeypatch.setattr(launch, "resolve", slow_fetch)
    write_models(tmp_path / "models.toml", m=fleet.model_set.specs[0].source, big="hf:o/big")
    first = {}
    under_way = threading.Thread(target=lambda: first.update(reloader.reload("admin")))
    under_way.start()
    try:
        assert fetching.wait(5)
        answered = {}
        # In threads of their own: a trigger that waited for the fetch would hang here, not the test.
        triggers = [threading.Thread(target=lambda: answered.update(post=post(reloader))),
                    threading.Thread(target=lambda: answered.update(sighup=reloader.reload_logged("SIGHUP")))]
        with caplog.at_level(logging.INFO, logger="service.models.reload"):
            for trigger in triggers:
                trigger.start()
            for trigger in triggers:
                trigger.join(5)
        assert set(answered) == {"post", "sighup"}, "a trigger waited for the reload under way"
        error = assert_openai_envelope(answered["post"], 409)
        assert (error["code"], error["type"]) == ("reload_in_progress", "invalid_request_error")
        skipped = [record for record in caplog.records if record.getMessage().startswith("models reload skipped")]
        assert sorted(record.fields["trigger"] for record in skipped) == ["SIGHUP", "admin"]
    finally:
        go_on.set()
        under_way.join(10)
    assert first["added"] == ["big"] and set(fleet.supervisors) == {"m", "big"}
    # Once it has ended, the next reload runs.
    assert reloader.reload("admin") == {"added": [], "removed": [], "changed": [], "updated": []}


def test_a_model_the_pool_refuses_is_a_refusal_not_a_500(tmp_path, post):
    path = tmp_path / "models.toml"
    write_models(path, m="hf:o/r")

    def apply(model_set):
        raise ValueError("model m: another model already serves on http://127.0.0.1:9")
    reloader = Reloader(str(path), apply)
    with pytest.raises(ReloadError) as refused:
        reloader.reload("admin")
    assert refused.value.unavailable
    error = assert_openai_envelope(post(reloader), 503)
    assert (error["code"], error["type"]) == ("model_unavailable", "server_error")
    assert error["message"] == f"{path}: model m: another model already serves on http://127.0.0.1:9"
