"""Projectors (mmproj) for models named hf: (service/models/projector.py), against the local stand-in of the Hub
(fake_hub.py): which one a repo offers, where it is kept, finding it again offline, and never taking one for a
model."""
import json
import logging
import os
import struct

import pytest
from huggingface_hub import HfApi, constants

from service.models.hub import HubError, fetch, pick
from service.models.model_file import model_files
from service.models.projector import fetch_projector, gguf_architecture, is_projector, pick_projector
from tests.fake_hub import FakeHub, demo_gguf, point_huggingface_hub_at, projector_gguf, vision_repo

VISION = "acme/vision-GGUF"
FOLDER = "mmproj-acme--vision-GGUF"  # where the repo's projectors are kept, in MODELS_DIR


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> bytes:
    """A real model GGUF's bytes."""
    return demo_gguf(tmp_path_factory)


@pytest.fixture(scope="module")
def files(gguf, tmp_path_factory) -> dict:
    """The vision repo's files: a model, mmproj-model-f16.gguf and mmproj-model-q8_0.gguf."""
    return vision_repo(gguf, tmp_path_factory)


@pytest.fixture
def hub(gguf, files, monkeypatch, tmp_path, no_internet):
    """The stand-in Hub with the vision repo and a text-only one, pointed at with HF_ENDPOINT."""
    stand_in = FakeHub()
    stand_in.add_repo(VISION, files)
    stand_in.add_repo("acme/text-GGUF", {"text-Q4_K_M.gguf": gguf, "README.md": b"# text"})
    point_huggingface_hub_at(stand_in, monkeypatch, tmp_path)
    yield stand_in
    stand_in.stop()


def fetched(hub) -> list:
    """The files the stand-in sent (GETs of a repo file)."""
    return [r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]


def test_auto_fetches_the_f16_projector_beside_the_model_and_finds_it_offline(hub, models_dir, files, caplog,
                                                                            monkeypatch):
    caplog.set_level(logging.INFO)
    model = fetch(f"hf:{VISION}", models_dir)
    path = fetch_projector(f"hf:{VISION}", models_dir)
    assert path == os.path.join(models_dir, FOLDER, "mmproj-model-f16.gguf")
    assert os.path.dirname(os.path.dirname(path)) == os.path.dirname(model)  # in MODELS_DIR, beside the model
    with open(path, "rb") as kept:
        assert kept.read() == files["mmproj-model-f16.gguf"]
    assert fetched(hub) == ["vision-Q4_K_M.gguf", "mmproj-model-f16.gguf"]  # never the Q8_0 one
    progress = [r.fields for r in caplog.records if r.getMessage() == "download"]
    assert {(line["file"], line["percent"]) for line in progress} >= {("mmproj-model-f16.gguf", 100)}
    assert [m.path for m in model_files(models_dir)] == [model]  # the projector is no model

    hub.stop()  # a restart with the Hub gone
    seen = len(hub.requests)
    assert fetch_projector(f"hf:{VISION}", models_dir) == path
    assert len(hub.requests) == seen
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens (a stopped stand-in may still
    assert fetch_projector(f"hf:{VISION}", models_dir, refresh=True) == path  # answer on a kept-alive connection)


def test_a_repo_without_a_projector_gives_none_and_knows_it_offline(hub, models_dir, monkeypatch):
    assert fetch_projector("hf:acme/text-GGUF", models_dir) is None
    assert fetched(hub) == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    assert fetch_projector("hf:acme/text-GGUF", models_dir) is None  # known to have none: no request
    assert len(hub.requests) == seen


def test_offline_with_no_kept_projector_is_one_line(hub, models_dir, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError) as raised:
        fetch_projector(f"hf:{VISION}", models_dir)
    assert str(raised.value).startswith(f"hf:{VISION} (its projector): HF_HUB_OFFLINE is set and no copy is kept in ")
    assert "\n" not in str(raised.value) and hub.requests == []


def test_an_explicit_name_that_is_not_there_lists_the_projectors_there(hub, models_dir):
    with pytest.raises(HubError) as raised:
        fetch_projector(f"hf:{VISION}", models_dir, "mmproj-model-bf16.gguf")
    assert str(raised.value) == (f"hf:{VISION} has no file mmproj-model-bf16.gguf; its projectors: "
                                 "mmproj-model-f16.gguf, mmproj-model-q8_0.gguf")
    assert fetched(hub) == [] and not os.path.exists(os.path.join(models_dir, FOLDER))


@pytest.mark.parametrize("choice, expected", [
    ("mmproj-model-q8_0.gguf", "mmproj-model-q8_0.gguf"),  # a file in the model's repo
    (f"hf:{VISION}/mmproj-model-q8_0.gguf", "mmproj-model-q8_0.gguf"),
    (f"hf:{VISION}", "mmproj-model-f16.gguf"),  # the repo's best
    (f"hf:{VISION}:Q8_0", "mmproj-model-q8_0.gguf"),  # of that precision
])
def test_a_projector_named_is_the_one_fetched(hub, models_dir, files, choice, expected):
    path = fetch_projector("hf:acme/text-GGUF", models_dir, choice) if choice.startswith("hf:") else \
        fetch_projector(f"hf:{VISION}", models_dir, choice)
    assert path == os.path.join(models_dir, FOLDER, expected)
    with open(path, "rb") as kept:
        assert kept.read() == files[expected]
    assert fetched(hub) == [expected]


def test_projectors_of_the_same_name_from_two_repos_are_kept_apart(hub, models_dir, files, tmp_path_factory):
    other = projector_gguf(tmp_path_factory, "f16-other")
    hub.add_repo("other/vision-GGUF", {"vision-Q4_K_M.gguf": b"GGUF", "mmproj-model-f16.gguf": other})
    mine, theirs = fetch_projector(f"hf:{VISION}", models_dir), fetch_projector("hf:other/vision-GGUF", models_dir)
    assert (open(mine, "rb").read(), open(theirs, "rb").read()) == (files["mmproj-model-f16.gguf"], other)
    assert theirs == os.path.join(models_dir, "mmproj-other--vision-GGUF", "mmproj-model-f16.gguf")


def test_a_mirrors_repo_id_never_names_the_folder(hub, models_dir, files, monkeypatch):
    # The listing's id is the mirror's word: with backslashes it would lead outside MODELS_DIR on Windows.
    listing = HfApi.model_info

    def hostile(self, *args, **kwargs):
        info = listing(self, *args, **kwargs)
        info.id = "..\\..\\evil/x"
        return info

    monkeypatch.setattr(HfApi, "model_info", hostile)
    path = fetch_projector(f"hf:{VISION}", models_dir)
    assert path == os.path.join(models_dir, FOLDER, "mmproj-model-f16.gguf")
    assert sorted(os.listdir(models_dir)) == [".cache", FOLDER]


def test_a_listing_name_with_a_drive_is_never_a_projector():
    names = ["C:mmproj-F16.gguf", "sub\\mmproj-F16.gguf", "mmproj-model-f16.gguf", "m-Q4_K_M.gguf"]
    assert pick_projector(names) == "mmproj-model-f16.gguf"


@pytest.mark.parametrize("entry", ["../outside.gguf", "..\\outside.gguf", "C:outside.gguf"])
def test_a_record_naming_a_file_outside_models_dir_is_no_kept_projector(hub, models_dir, monkeypatch, entry):
    record = os.path.join(models_dir, ".cache", "llama-gateway", "hf", "acme", "vision-gguf", "_mmproj-F16.json")
    os.makedirs(os.path.dirname(record))
    with open(record, "w") as out:
        json.dump({"repo": VISION, "commit": "c", "files": [entry]}, out)
    open(os.path.normpath(os.path.join(models_dir, *entry.split("/"))), "wb").close()  # there, where it leads
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and no copy is kept in "):
        fetch_projector(f"hf:{VISION}", models_dir, f"hf:{VISION}:F16")


def test_a_file_put_there_by_hand_is_never_replaced(hub, models_dir):
    os.makedirs(os.path.join(models_dir, FOLDER))
    mine = os.path.join(models_dir, FOLDER, "mmproj-model-f16.gguf")
    with open(mine, "wb") as out:
        out.write(b"my own projector")
    with pytest.raises(HubError, match=r"mmproj-model-f16\.gguf is there already and was not fetched from "
                                       r"acme/vision-GGUF: move it away$"):
        fetch_projector(f"hf:{VISION}", models_dir)
    assert open(mine, "rb").read() == b"my own projector"


def test_a_local_model_has_no_repo_to_take_a_projector_from(models_dir):
    assert fetch_projector("/models/chat.gguf", models_dir) is None
    assert fetch_projector(f"hf:{VISION}", models_dir, "none") is None
    with pytest.raises(HubError, match=r"^/models/chat\.gguf: a projector named mmproj\.gguf is looked for in the "
                                       r"model's hf: repo, and /models/chat\.gguf is a local file: "):
        fetch_projector("/models/chat.gguf", models_dir, "mmproj.gguf")
    with pytest.raises(HubError, match=r"^hf:acme/x: mmproj must be auto, none, a path, hf:OWNER/REPO/FILE\.gguf or "
                                       r"the name of a \.gguf file in acme/x, not '\.\./mmproj\.gguf'$"):
        fetch_projector("hf:acme/x", models_dir, "../mmproj.gguf")


@pytest.mark.parametrize("names, model, expected", [
    # F16, else BF16, else F32, whatever their names' order
    (["mmproj-a-q8_0.gguf", "mmproj-b-bf16.gguf", "mmproj-c-f16.gguf", "m-Q4_K_M.gguf"], "m-Q4_K_M.gguf",
     "mmproj-c-f16.gguf"),
    (["mmproj-a-F32.gguf", "mmproj-b-BF16.gguf", "mmproj-Q8_0.gguf"], None, "mmproj-b-BF16.gguf"),
    (["mmproj-a-Q8_0.gguf", "mmproj-b-F32.gguf"], None, "mmproj-b-F32.gguf"),
    (["mmproj-b-Q8_0.gguf", "mmproj-a-Q4_0.gguf", "README.md"], None, "mmproj-a-Q4_0.gguf"),  # the first by name
    (["m-Q4_K_M.gguf", "gemma-3-4b-it-mmproj-f16.gguf"], "m-Q4_K_M.gguf", "gemma-3-4b-it-mmproj-f16.gguf"),
    # The nearest folder first, as llama-server: the model's own, then above; never a folder beside it.
    (["mmproj-F16.gguf", "sub/mmproj-Q8_0.gguf", "other/mmproj-F16.gguf"], "sub/m-Q4_K_M.gguf", "sub/mmproj-Q8_0.gguf"),
    (["mmproj-Q8_0.gguf", "other/mmproj-F16.gguf"], "sub/m-Q4_K_M.gguf", "mmproj-Q8_0.gguf"),
    (["other/mmproj-F16.gguf", "../mmproj-F16.gguf"], "m-Q4_K_M.gguf", None),
    (["m-Q4_K_M.gguf", "README.md"], "m-Q4_K_M.gguf", None),
])
def test_the_projector_a_repo_offers_a_model(names, model, expected):
    assert pick_projector(names, model) == expected


@pytest.mark.parametrize("names, quant, expected", [
    (["mmproj-v-Q8_0.gguf", "v-Q8_0.gguf", "v-Q4_K_M.gguf"], "Q8_0", ["v-Q8_0.gguf"]),
    (["mmproj-model-f16.gguf", "v-F16.gguf"], None, ["v-F16.gguf"]),  # the repo's one model: not two
    (["MMPROJ-v-Q4_K_M.gguf", "v-Q4_K_M.gguf"], None, ["v-Q4_K_M.gguf"]),
])
def test_the_quant_pick_never_picks_a_projector(names, quant, expected):
    assert pick(names, "o/v", quant) == expected


@pytest.mark.parametrize("names, quant, message", [
    (["mmproj-model-f16.gguf", "mmproj-model-q8_0.gguf"], None, "hf:o/v holds no GGUF model"),
    (["mmproj-v-Q8_0.gguf", "v-Q4_K_M.gguf"], "Q8_0", "hf:o/v has no GGUF file for Q8_0; its quants: Q4_K_M "),
])
def test_a_repo_whose_only_match_is_a_projector_has_no_model_for_it(names, quant, message):
    with pytest.raises(HubError) as raised:
        pick(names, "o/v", quant)
    assert str(raised.value).startswith(message)


def test_model_files_never_lists_a_projector(tmp_path, gguf, files):
    (tmp_path / "chat.gguf").write_bytes(gguf)
    (tmp_path / "mmproj-F16.gguf").write_bytes(files["mmproj-model-f16.gguf"])  # put there by hand
    (tmp_path / "gemma-3-4b-it-mmproj-f16.gguf").write_bytes(files["mmproj-model-f16.gguf"])
    assert [m.name for m in model_files(str(tmp_path))] == ["chat"]
    os.remove(tmp_path / "chat.gguf")
    (demo,) = model_files(str(tmp_path))  # projectors alone: no model, so the demo
    assert demo.is_demo


def gguf_header(*pairs) -> bytes:
    """A GGUF v3 header of (key, type, packed value) pairs and no tensors."""
    def text(value):
        return struct.pack("<Q", len(value)) + value.encode()
    body = b"".join(text(key) + struct.pack("<I", kind) + value for key, kind, value in pairs)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(pairs)) + body


def test_a_projector_is_told_by_its_name_or_its_header(tmp_path, gguf, files):
    model, encoder, renamed = tmp_path / "chat.gguf", tmp_path / "mmproj-x.gguf", tmp_path / "vision-encoder.gguf"
    model.write_bytes(gguf)
    encoder.write_bytes(b"")  # by its name alone
    renamed.write_bytes(files["mmproj-model-f16.gguf"])
    assert (is_projector(str(model)), is_projector(str(encoder)), is_projector(str(renamed))) == (False, True, True)
    assert gguf_architecture(str(model)) == "llama"


@pytest.mark.parametrize("content, architecture", [
    # Keys before it are skipped: numbers, a string, arrays of numbers and of strings.
    (gguf_header(("general.alignment", 4, struct.pack("<I", 32)), ("general.name", 8, b"\x02\0\0\0\0\0\0\0ab"),
                 ("a.list", 9, struct.pack("<IQ", 5, 2) + struct.pack("<ii", 1, 2)),
                 ("a.words", 9, struct.pack("<IQ", 8, 2) + b"\x01\0\0\0\0\0\0\0x" + b"\x01\0\0\0\0\0\0\0y"),
                 ("general.architecture", 8, b"\x04\0\0\0\0\0\0\0clip")), "clip"),
    (gguf_header(("general.architecture", 4, struct.pack("<I", 7))), None),  # not a string
    (gguf_header(("general.name", 8, b"\xff\xff\0\0\0\0\0\0ab")), None),  # cut short
    (gguf_header(("general.name", 13, b"")), None),  # an unknown type
    (gguf_header(("general.name", 8, b"\x02\0\0\0\0\0\0\0ab")), None),  # no architecture
    (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), None),  # version 1
    (b"not a gguf at all, but long enough to read a header from", None),
    (b"GG", None),
])
def test_the_architecture_is_read_from_the_header_alone(tmp_path, content, architecture):
    (tmp_path / "m.gguf").write_bytes(content)
    assert gguf_architecture(str(tmp_path / "m.gguf")) == architecture
    assert gguf_architecture(str(tmp_path / "missing.gguf")) is None
