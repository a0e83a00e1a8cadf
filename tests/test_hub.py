"""Models by name from Hugging Face (service/models/hub.py), against the local stand-in of the Hub (fake_hub.py):
which file a name picks, where it is kept, resuming, and what a cut or failed fetch leaves behind."""
import errno
import io
import json
import logging
import os
import re
from collections import namedtuple

import pytest
from huggingface_hub import constants, file_download

from service.converters import hub_model, model_file, model_paths
from service.models import hub as hub_module
from service.models.hub import HubError, fetch, kept_copy, pick
from service.models.hub_progress import LogProgress, progress_class
from service.models.model_file import LocalModel, choose_model, model_files, resolve
from service.models.names import model_name
from tests.fake_hub import FakeHub, demo_gguf, point_huggingface_hub_at

REPO = "acme/tiny-GGUF"
DiskUsage = namedtuple("DiskUsage", "total used free")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> bytes:
    """A real GGUF's bytes, served under every file name of the stand-in's repos."""
    return demo_gguf(tmp_path_factory)


@pytest.fixture
def hub(gguf, monkeypatch, tmp_path, no_internet):
    """The stand-in Hub with one repo of three quants and a split model, pointed at with HF_ENDPOINT."""
    stand_in = FakeHub()
    third = len(gguf) // 3
    stand_in.add_repo(REPO, {"tiny-Q4_K_M.gguf": gguf, "tiny-q8_0.gguf": gguf, "tiny-F16.gguf": gguf,
                             "mmproj-tiny-Q4_K_M.gguf": b"projector", "README.md": b"# tiny",
                             "big/tiny-Q6_K-00001-of-00003.gguf": gguf[:third],
                             "big/tiny-Q6_K-00002-of-00003.gguf": gguf[third:2 * third],
                             "big/tiny-Q6_K-00003-of-00003.gguf": gguf[2 * third:]})
    point_huggingface_hub_at(stand_in, monkeypatch, tmp_path)
    yield stand_in
    stand_in.stop()


@pytest.mark.parametrize("spec, parsed", [
    ("hf:ggml-org/gemma-3-1b-it-GGUF", ("ggml-org/gemma-3-1b-it-GGUF", None, None)),
    ("hf:ggml-org/gemma-3-1b-it-GGUF:q8_0", ("ggml-org/gemma-3-1b-it-GGUF", "q8_0", None)),
    ("hf:unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL", ("unsloth/Qwen3-8B-GGUF", "UD-Q4_K_XL", None)),
    ("hf:acme/m-GGUF/sub/m-Q4_K_M.gguf", ("acme/m-GGUF", None, "sub/m-Q4_K_M.gguf")),
])
def test_hf_names_are_settings_values_checked_for_their_form(spec, parsed):
    assert hub_model(spec) == parsed
    assert model_file(spec) == spec
    assert model_paths(f"chat={spec},other={spec}") == {"chat": spec, "other": spec}


@pytest.mark.parametrize("spec", ["hf:", "hf:gemma", "hf:a/b/c", "hf:a/b:", "hf:a/b/../x.gguf", "hf:a/b:Q4 K",
                                  "hf:-a/b", "hf:a--b/repo", "hf:a/b..c", "hf:o/r./x.gguf", "hf:o/r+x"])
def test_a_malformed_hf_name_says_which_forms_there_are(spec):
    forms = r"must be hf:OWNER/REPO, hf:OWNER/REPO:QUANT or hf:OWNER/REPO/FILE\.gguf, such as hf:ggml-org/"
    with pytest.raises(ValueError, match=forms):
        model_file(spec)
    with pytest.raises(HubError, match=f"^{re.escape(spec)}: {forms}"):  # bin/pull's line
        fetch(spec, "unused")


FILES = ["a-Q4_K_M.gguf", "a-q8_0.gguf", "a.BF16.gguf", "mmproj-a-Q4_K_M.gguf", "README.md",
         "Q6/a-Q6_K-00002-of-00002.gguf", "Q6/a-Q6_K-00001-of-00002.gguf", "Q5/a-Q5_K_M-00001-of-00002.gguf"]


@pytest.mark.parametrize("quant, file, expected", [
    (None, None, ["a-Q4_K_M.gguf"]),  # the default quant; the projector is no model
    ("Q8_0", None, ["a-q8_0.gguf"]),  # the tag in any case
    ("bf16", None, ["a.BF16.gguf"]),
    ("q6_k", None, ["Q6/a-Q6_K-00001-of-00002.gguf", "Q6/a-Q6_K-00002-of-00002.gguf"]),  # every part, in order
    (None, "Q6/a-Q6_K-00002-of-00002.gguf", ["Q6/a-Q6_K-00001-of-00002.gguf", "Q6/a-Q6_K-00002-of-00002.gguf"]),
    (None, "a-q8_0.gguf", ["a-q8_0.gguf"]),
])
def test_a_name_picks_the_files_of_one_model(quant, file, expected):
    assert pick(FILES, "o/a", quant, file) == expected


def test_a_listing_that_names_files_outside_the_repo_never_has_them_picked():
    hostile = ["../evil-Q4_K_M.gguf", "/abs/evil-Q4_K_M.gguf", "a\\..\\evil-Q4_K_M.gguf", "x//evil-Q4_K_M.gguf",
               "C:evil-Q4_K_M.gguf", "good-Q4_K_M.gguf"]  # C:NAME: a path on drive C, on Windows
    assert pick(hostile, "o/a") == ["good-Q4_K_M.gguf"]


@pytest.mark.parametrize("entry", ["../outside-Q4_K_M.gguf", "..\\outside-Q4_K_M.gguf", "C:outside-Q4_K_M.gguf",
                                   "sub/../../outside-Q4_K_M.gguf", 7])
def test_a_record_naming_a_file_outside_models_dir_is_no_kept_copy(models_dir, entry):
    # A record is checked as a listing is: one edited, or written from a mirror's listing, leads nowhere outside.
    record = os.path.join(models_dir, ".cache", "llama-gateway", "hf", "o", "a", "Q4_K_M.json")
    os.makedirs(os.path.dirname(record))
    os.makedirs(os.path.join(models_dir, "sub"))  # so that sub/.. resolves
    with open(record, "w") as out:
        json.dump({"repo": "o/a", "commit": "c", "files": [entry]}, out)
    if isinstance(entry, str):  # the file is there, where the entry leads (on this system)
        target = os.path.normpath(os.path.join(models_dir, *entry.split("/")))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "wb").close()
    assert kept_copy(models_dir, "hf:o/a:Q4_K_M") is None


def test_a_mirrors_password_never_reaches_the_log(caplog):
    import logging

    from service.models import hub as hub_module

    hub_module._quiet_hub()
    with caplog.at_level(logging.WARNING, logger="huggingface_hub"):
        logging.getLogger("huggingface_hub").warning("Error while downloading from %s", "http://user:S3CRET@mirror/x")
    assert "S3CRET" not in caplog.text and "http://mirror/x" in caplog.text


def test_a_repo_of_one_model_needs_no_quant_but_a_named_quant_must_be_there():
    assert pick(["e-F16.gguf", "README.md"], "o/e") == ["e-F16.gguf"]
    with pytest.raises(HubError, match=r"^hf:o/e has no GGUF file for Q8_0; its quants: F16 \(name one as "
                                       r"hf:o/e:F16\)$"):
        pick(["e-F16.gguf"], "o/e", "Q8_0")


@pytest.mark.parametrize("quant, file, message", [
    ("Q2_K", None, "hf:o/a has no GGUF file for Q2_K; its quants: Q6_K, Q4_K_M, q8_0, BF16 (name one as hf:o/a:Q6_K)"),
    ("Q5_K_M", None, "hf:o/a has no GGUF file for Q5_K_M; its quants: "),  # a split model missing a part is none
    ("Q4_K", None, "hf:o/a has no GGUF file for Q4_K; its quants: "),  # never Q4_K_M
    (None, "b.gguf", "hf:o/a has no GGUF file b.gguf; its GGUF files: Q6/a-Q6_K-00001-of-00002.gguf, a-Q4_K_M.gguf"),
])
def test_what_a_repo_lacks_is_said_with_what_it_has(quant, file, message):
    with pytest.raises(HubError) as raised:
        pick(FILES, "o/a", quant, file)
    assert str(raised.value).startswith(message)


def test_several_files_for_one_quant_ask_for_the_file():
    with pytest.raises(HubError, match=r"several GGUF files for Q4_K_M: a-Q4_K_M\.gguf, b-Q4_K_M\.gguf; name one "
                                       r"as hf:o/a/FILE\.gguf"):
        pick(["a-Q4_K_M.gguf", "b-Q4_K_M.gguf"], "o/a")


def test_fetched_once_then_found_kept_with_no_request(hub, models_dir, gguf):
    path = fetch(f"hf:{REPO}", models_dir)
    assert path == os.path.join(models_dir, "tiny-Q4_K_M.gguf")
    with open(path, "rb") as fetched:
        assert fetched.read() == gguf
    assert [(r.method, r.path.split("/")[-1]) for r in hub.requests] == [
        ("GET", "main"), ("HEAD", "tiny-Q4_K_M.gguf"), ("GET", "tiny-Q4_K_M.gguf")]
    with open(os.path.join(models_dir, ".cache", "llama-gateway", ".gitignore")) as ignore:
        assert ignore.read() == "*\n"  # models/ may be in a git checkout: the records stay out of it
    hub.stop()  # a restart with the Hub gone
    seen = len(hub.requests)
    model = choose_model(f"hf:{REPO}", models_dir)
    assert model == LocalModel("tiny-Q4_K_M", path, "LLAMA_MODEL")
    assert resolve(path, models_dir) == path  # a path is served as it is
    assert len(hub.requests) == seen
    assert [m.name for m in model_files(models_dir)] == ["tiny-Q4_K_M"]


def test_a_split_model_comes_whole_and_is_named_without_its_part_number(hub, models_dir, gguf):
    path = fetch(f"hf:{REPO}:Q6_K", models_dir)
    assert path == os.path.join(models_dir, "big", "tiny-Q6_K-00001-of-00003.gguf")
    parts = [os.path.join(models_dir, "big", f"tiny-Q6_K-0000{n}-of-00003.gguf") for n in (1, 2, 3)]
    assert b"".join(open(part, "rb").read() for part in parts) == gguf
    assert model_name(path) == "tiny-Q6_K"
    assert kept_copy(models_dir, f"hf:{REPO}:q6_k") == path
    os.remove(parts[2])  # a part gone: no longer a kept copy, and fetched again
    assert kept_copy(models_dir, f"hf:{REPO}:Q6_K") is None


def test_a_cut_transfer_resumes_where_it_stopped(hub, models_dir, gguf, monkeypatch, caplog):
    monkeypatch.setattr(file_download.time, "sleep", lambda seconds: None)  # its pause before resuming
    # huggingface_hub writes whole chunks (10 MiB; 64 KiB here): it resumes after the last one it wrote.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 65536)
    half = len(gguf) // 2
    hub.cut("tiny-F16.gguf", after=half)
    path = fetch(f"hf:{REPO}:F16", models_dir)
    assert hub.gets("tiny-F16.gguf") == [None, f"bytes={half // 65536 * 65536}-"]
    with open(path, "rb") as fetched:
        assert fetched.read() == gguf
    # huggingface_hub's warning goes to the gateway's log (a JSON line) and nowhere else: it has no handler of its own.
    assert any("Trying to resume download" in record.getMessage() for record in caplog.records)
    assert logging.getLogger("huggingface_hub").handlers == []


def test_a_failed_fetch_leaves_nothing_a_start_takes_for_a_model(hub, models_dir, monkeypatch):
    monkeypatch.setattr(file_download.time, "sleep", lambda seconds: None)
    hub.cut("tiny-Q6_K-00002-of-00003.gguf", after=1000, then=500)  # part 1 whole, part 2 cut, then the Hub fails
    with pytest.raises(HubError, match=r"^hf:acme/tiny-GGUF:Q6_K: .* answered 500: try again later$"):
        fetch(f"hf:{REPO}:Q6_K", models_dir)
    assert os.path.isfile(os.path.join(models_dir, "big", "tiny-Q6_K-00001-of-00003.gguf"))
    assert kept_copy(models_dir, f"hf:{REPO}:Q6_K") is None
    (demo,) = model_files(models_dir)
    assert demo.is_demo
    left = [name for _, _, names in os.walk(models_dir) for name in names if name.endswith(".incomplete")]
    assert left == []
    assert fetch(f"hf:{REPO}:Q6_K", models_dir).endswith("tiny-Q6_K-00001-of-00003.gguf")  # part 1 not fetched again
    assert hub.gets("tiny-Q6_K-00001-of-00003.gguf") == [None]


def test_only_whole_models_count_in_models_dir(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    for part in ("b-00001-of-00002", "b-00002-of-00002", "c-00001-of-00002", "a.gguf.1234abcd"):
        (tmp_path / f"{part}.gguf").write_bytes(b"GGUF")
    downloads = tmp_path / ".cache" / "huggingface" / "download"
    downloads.mkdir(parents=True)
    (downloads / "d.gguf.1234abcd.incomplete").write_bytes(b"")
    assert [m.name for m in model_files(str(tmp_path))] == ["a", "a.gguf.1234abcd", "b"]


def test_the_disk_full_is_one_line(hub, models_dir, monkeypatch):
    def no_space(url, temp_file, **kwargs):
        temp_file.write(b"GGUF")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_download, "http_get", no_space)
    with pytest.raises(HubError, match=r"^hf:acme/tiny-GGUF: the disk is full: free some space in .*models, or set "
                                       r"MODELS_DIR to a folder on a larger disk$"):
        fetch(f"hf:{REPO}", models_dir)
    assert [name for _, _, names in os.walk(models_dir) for name in names if "tiny-Q4_K_M.gguf" == name] == []


def test_a_disk_too_small_is_known_before_a_byte_is_fetched(hub, models_dir, monkeypatch):
    monkeypatch.setattr(hub_module.shutil, "disk_usage", lambda path: DiskUsage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(HubError, match=r"the disk is full: 0\.5 MiB needed in .*, 0\.0 MiB free"):
        fetch(f"hf:{REPO}", models_dir)
    assert hub.gets("tiny-Q4_K_M.gguf") == []


def test_a_file_put_there_by_hand_is_never_replaced(hub, models_dir):
    os.makedirs(models_dir)
    mine = os.path.join(models_dir, "tiny-Q4_K_M.gguf")
    with open(mine, "wb") as out:
        out.write(b"my own model")
    with pytest.raises(HubError, match=r"tiny-Q4_K_M\.gguf is there already and was not fetched from acme/tiny-GGUF"):
        fetch(f"hf:{REPO}", models_dir)
    with open(mine, "rb") as kept:
        assert kept.read() == b"my own model"


def test_a_file_of_the_same_name_from_another_repo_is_never_replaced(hub, models_dir, gguf):
    kept = fetch(f"hf:{REPO}", models_dir)
    hub.add_repo("other/tiny-GGUF", {"tiny-Q4_K_M.gguf": gguf[::-1]})
    with pytest.raises(HubError, match=r"tiny-Q4_K_M\.gguf was fetched from acme/tiny-GGUF, and other/tiny-GGUF has a "
                                       r"file of the same name: set MODELS_DIR to another folder for one of them$"):
        fetch("hf:other/tiny-GGUF", models_dir)
    with open(kept, "rb") as still:
        assert still.read() == gguf


def test_offline_mode_uses_the_kept_copy_and_says_when_there_is_none(hub, models_dir, monkeypatch):
    path = fetch(f"hf:{REPO}", models_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    assert fetch(f"hf:{REPO}", models_dir, refresh=True) == path
    with pytest.raises(HubError, match=r"^hf:acme/tiny-GGUF:Q8_0: HF_HUB_OFFLINE is set and no copy is kept in "):
        fetch(f"hf:{REPO}:Q8_0", models_dir)
    assert len(hub.requests) == seen


def test_stale_partials_of_killed_fetches_are_swept(hub, models_dir):
    downloads = os.path.join(models_dir, ".cache", "huggingface", "download")
    os.makedirs(downloads)
    stale, live = os.path.join(downloads, "x.gguf.0a1b.incomplete"), os.path.join(downloads, "y.gguf.2c3d.incomplete")
    for path in (stale, live):
        open(path, "wb").close()
    os.utime(stale, (0, 0))
    fetch(f"hf:{REPO}", models_dir)
    assert (os.path.exists(stale), os.path.exists(live)) == (False, True)


def test_progress_in_the_logs_is_a_line_at_start_each_tenth_and_end(caplog):
    caplog.set_level(logging.INFO, logger="service.models.hub")
    progress = type("P", (LogProgress,), {"file": "m.gguf", "part": "1/2"})
    with progress(total=1000, desc="(…)m.gguf", unit="B") as bar:
        for _ in range(100):
            bar.update(10)
        bar.update_transfer(10)
    lines = [record.fields for record in caplog.records]
    assert [line["percent"] for line in lines] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert lines[-1]["done"] is True and lines[0]["file"] == "m.gguf" and lines[0]["part"] == "1/2"
    assert json.dumps(lines)  # plain values, for the JSON log


def test_on_a_terminal_the_bar_shows_the_file_its_size_and_speed():
    screen = io.StringIO()
    bar_class = progress_class("m-00001-of-00002.gguf", "1/2", bar=True)
    with bar_class(total=2**20, initial=0, desc="(…)0002.gguf", unit="B", unit_scale=True, file=screen) as bar:
        bar.update(2**20)
        bar.update_transfer(2**19)  # Xet's network bytes: one bar, of the bytes written
    last = screen.getvalue().split("\r")[-1]
    assert last.startswith("m-00001-of-00002.gguf (1/2): 100%") and "1.05M/1.05M [00:00<00:00, " in last
    assert last.rstrip().endswith("B/s]")
