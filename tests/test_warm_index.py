"""Warm conversations on disk, without llama.cpp: the model identity a state is bound to, the index of saved states
(what survives a restart, what is dropped on open), the disk budget, and the live slot table."""
import itertools
import json
import logging
import os
import shutil

from service.warm.budget import MIB, DiskBudget
from service.warm.identity import model_identity, state_flags
from service.warm.index import StateIndex, state_name
from service.warm.slots import SlotTable

KEYS = [bytes([n]) * 16 for n in range(1, 6)]


def counting_clock():
    """A wall clock that moves one second per call, so last-use order is exact."""
    return itertools.count(1000).__next__


def write_state(index, key, nbytes, tokens=100):
    """A state file as llama.cpp would leave it, recorded in index."""
    index.make_directory()
    with open(index.path(key), "wb") as file:
        file.write(b"\1" * nbytes)
    index.add(key, tokens, nbytes)


def test_identity_changes_with_what_shapes_a_state_and_not_with_where_it_listens(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 64)
    base = ["--model", str(model), "--ctx-size", "2048", "--parallel", "2"]
    same = model_identity(model, base + ["--port", "8080", "--host", "0.0.0.0", "--threads=4", "--alias", "a",
                                         "--slot-save-path", "/x/", "--metrics", "--threads-http", "9"], "b1")
    assert same == model_identity(model, base, "b1") and len(same) == 16
    assert state_flags(["-t", "2", "--ctx-size", "512", "--api-key", "secret"]) == ["--ctx-size", "512"]
    assert model_identity(model, base[:3] + ["4096"] + base[4:], "b1") != same  # another context size
    assert model_identity(model, base + ["--cache-type-k", "q8_0"], "b1") != same
    assert model_identity(model, base, "b2") != same  # another llama.cpp build
    model.write_bytes(b"GGUF" + b"\0" * 65)  # the model file replaced
    assert model_identity(model, base, "b1") != same


def test_identity_changes_when_a_file_a_flag_names_is_replaced_in_place(tmp_path):
    model, adapter, projector = tmp_path / "m.gguf", tmp_path / "a.gguf", tmp_path / "p.gguf"
    for path in (model, adapter, projector):
        path.write_bytes(b"GGUF" + b"\0" * 64)
    flags = ["--ctx-size", "2048", "--lora", str(adapter), f"--mmproj={projector}", "--control-vector", "/none/cv"]
    before = model_identity(model, flags, "b1")
    assert model_identity(model, flags, "b1") == before
    adapter.write_bytes(b"GGUF" + b"\1" * 64)  # the same size: only its mtime tells
    stat = os.stat(adapter)
    os.utime(adapter, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    after_adapter = model_identity(model, flags, "b1")
    assert after_adapter != before
    projector.write_bytes(b"GGUF" + b"\0" * 99)  # named as --flag=path
    assert model_identity(model, flags, "b1") != after_adapter


def test_the_index_survives_a_reopen_and_drops_what_does_not_match(tmp_path):
    directory = str(tmp_path / "abcdef0123456789")
    index = StateIndex(directory, "abcdef0123456789", "demo")
    for key in KEYS[:3]:
        write_state(index, key, 10)
    open(os.path.join(directory, KEYS[3].hex() + ".tmp"), "wb").close()  # a save cut short by a crash
    open(os.path.join(directory, state_name(KEYS[4])), "wb").close()  # a state the index never recorded
    with open(index.path(KEYS[1]), "ab") as file:
        file.write(b"more")  # resized since it was recorded
    os.remove(index.path(KEYS[2]))  # deleted by hand

    reopened = StateIndex(directory, "abcdef0123456789")
    assert list(reopened.entries()) == [KEYS[0]] and reopened.model == "demo"
    assert sorted(os.listdir(directory)) == sorted(["index.json", state_name(KEYS[0])])
    assert reopened.lookup([KEYS[4], KEYS[1], KEYS[2]]) is None  # dropped on open: never found
    assert reopened.lookup([KEYS[0], KEYS[1]])[0] == KEYS[0]  # the longest key that has a state
    assert json.load(open(os.path.join(directory, "index.json")))["entries"].keys() == {KEYS[0].hex()}
    # Made under another identity: nothing of it is trusted.
    assert StateIndex(directory, "0000000000000000").entries() == {}
    assert os.listdir(directory) == ["index.json"]


def test_an_unreadable_index_is_empty_and_a_deleted_directory_is_fine(tmp_path):
    directory = tmp_path / "abcdef0123456789"
    directory.mkdir()
    (directory / "index.json").write_text("{not json")
    index = StateIndex(str(directory), "abcdef0123456789")
    assert index.entries() == {}
    write_state(index, KEYS[0], 10)
    for name in os.listdir(directory):
        os.remove(directory / name)
    directory.rmdir()
    assert index.lookup(KEYS[:1]) is None and index.entries() == {}
    write_state(index, KEYS[1], 10)  # the next save makes it again
    assert StateIndex(str(directory), "abcdef0123456789").lookup(KEYS)[0] == KEYS[1]


def test_states_deleted_with_their_directory_leave_the_index_and_the_budget(tmp_path):
    budget = DiskBudget(str(tmp_path), limit_mib=1)
    index = budget.index("abcdef0123456789", "demo")
    for key in KEYS[:3]:
        write_state(index, key, 100 * 1024)
    assert budget.total_bytes() == 300 * 1024
    shutil.rmtree(index.directory)  # by hand, while the gateway runs
    assert budget.total_bytes() == 0 and index.entries() == {}
    write_state(index, KEYS[3], 10)  # the next save makes it again: only what it holds is written
    with open(os.path.join(index.directory, "index.json")) as file:
        assert json.load(file)["entries"].keys() == {KEYS[3].hex()}
    # Deleted and made again by someone else (the next load asks for its --slot-save-path) before anything looked.
    shutil.rmtree(index.directory)
    os.makedirs(index.directory)
    assert budget.total_bytes() == 0 and index.lookup(KEYS) is None


def test_the_budget_deletes_the_least_recently_used_states_of_any_model(tmp_path):
    clock = counting_clock()
    budget = DiskBudget(str(tmp_path), limit_mib=1)
    first = budget.index("aaaaaaaaaaaaaaaa")
    first._clock = clock
    write_state(first, KEYS[0], 400 * 1024)
    # A model not loaded now: its directory is found under root, its states count too.
    other = StateIndex(str(tmp_path / "bbbbbbbbbbbbbbbb"), "bbbbbbbbbbbbbbbb", clock=clock)
    write_state(other, KEYS[1], 400 * 1024)
    write_state(first, KEYS[2], 400 * 1024)
    first.touch(KEYS[0])  # used again: now the newest
    assert budget.total_bytes() == 1200 * 1024
    assert budget.enforce() == 1
    assert set(budget.index("bbbbbbbbbbbbbbbb").entries()) == set()  # the oldest, another model's, went
    assert not os.path.exists(other.path(KEYS[1]))
    assert set(first.entries()) == {KEYS[0], KEYS[2]} and budget.total_bytes() <= MIB


def test_a_nearly_full_disk_skips_saving_with_one_warning(tmp_path, caplog):
    free = __import__("shutil").disk_usage(tmp_path).free
    budget = DiskBudget(str(tmp_path), limit_mib=1, margin_bytes=free + MIB)
    with caplog.at_level(logging.WARNING, logger="service.warm.budget"):
        assert not budget.room_for(1) and not budget.room_for(1)
        budget.saved()
        assert not budget.room_for(1)
    assert len(caplog.records) == 2  # once, then once more after a save succeeded
    assert DiskBudget(str(tmp_path), limit_mib=1, margin_bytes=0).room_for(1000)
    assert not DiskBudget(str(tmp_path), limit_mib=1, margin_bytes=0).room_for(2 * MIB)  # never fits the limit


def test_the_slot_table_knows_holders_and_what_to_save():
    now = [0.0]
    table = SlotTable(3, clock=lambda: now[0])
    conversation = KEYS[:3]
    table.ran(0, conversation[:2], 500)
    now[0] = 0.1
    table.ran(1, [KEYS[0], KEYS[4]], 2000)  # another conversation, same system prompt, later
    assert table.holder(conversation) == (0, 2)
    assert table.holder([KEYS[0]]) == (1, 1)  # equals: the one used last
    assert table.holder([KEYS[3]]) is None
    now[0] = 0.5
    assert table.to_save(now[0], idle_s=1, interval_s=0, min_tokens=100) == []  # used too recently
    now[0] = 2.0
    assert table.to_save(now[0], idle_s=1, interval_s=0, min_tokens=100) == [0, 1]
    assert table.to_save(now[0], idle_s=1, interval_s=0, min_tokens=1000) == [1]
    table.saved(1, KEYS[4])
    table.ran(0, conversation, 600)  # busy: still unsaved, since 0.0
    assert table.to_save(now[0], idle_s=5, interval_s=0, min_tokens=100) == []
    assert table.to_save(now[0], idle_s=5, interval_s=2, min_tokens=100) == [0]  # unsaved for long enough
    table.restored(2, KEYS[3], 900)
    assert table.holder([KEYS[3]]) == (2, 1) and table.content(2)[:2] == (KEYS[3], 900)
    assert table.to_save(9.0, idle_s=0, interval_s=0, min_tokens=1) == [0]  # a restored state is saved already
    table.forget(0)
    assert table.holder(conversation) == (1, 1)
    table.clear()
    assert table.holder(conversation) is None and table.content(1) is None


def test_a_state_is_also_found_under_its_preamble_alias_the_newest_winning(tmp_path):
    budget = DiskBudget(str(tmp_path), limit_mib=1)
    index = budget.index("abcdef0123456789", "demo")
    index._clock = counting_clock()
    preamble, first, second = KEYS[0], KEYS[1], KEYS[2]
    index.make_directory()
    for key, nbytes in ((first, 300 * 1024), (second, 400 * 1024)):
        with open(index.path(key), "wb") as file:
            file.write(b"\1" * nbytes)
        index.add(key, nbytes // 1024, nbytes, alias=preamble)
    # A new conversation knows only the preamble: the newest state that begins with it.
    assert index.lookup([preamble, KEYS[3]]) == (second, index.entries()[second])
    assert index.lookup([preamble, first])[0] == first  # a conversation's own state wins over the alias
    assert set(index.entries()) == {first, second} and budget.total_bytes() == 700 * 1024  # counted once
    reopened = StateIndex(index.directory, "abcdef0123456789")  # a restart keeps the alias
    assert reopened.aliases() == {preamble: second} and reopened.lookup([preamble])[0] == second
    index.drop(second)  # its alias goes with it: never found pointing at a deleted file
    assert index.aliases() == {} and index.lookup([preamble]) is None and index.lookup([first])[0] == first
    with open(os.path.join(index.directory, "index.json")) as file:
        assert json.load(file)["aliases"] == {}
    index.add(first, 300, 300 * 1024, alias=preamble)
    index.touch(first)
    write_state(index, KEYS[4], 900 * 1024)  # over the budget: the least recently used (first) goes
    assert budget.enforce() == 1 and index.aliases() == {} and index.lookup([preamble]) is None


def test_an_alias_to_a_state_dropped_on_open_is_dropped_and_a_version_1_index_is_read(tmp_path):
    directory = str(tmp_path / "abcdef0123456789")
    index = StateIndex(directory, "abcdef0123456789")
    write_state(index, KEYS[1], 10)
    index.add(KEYS[1], 100, 10, alias=KEYS[0])
    write_state(index, KEYS[2], 10)
    index.add(KEYS[2], 100, 10, alias=KEYS[3])
    with open(index.path(KEYS[2]), "ab") as file:
        file.write(b"more")  # resized since it was recorded
    reopened = StateIndex(directory, "abcdef0123456789")
    assert reopened.aliases() == {KEYS[0]: KEYS[1]} and reopened.lookup([KEYS[3]]) is None
    with open(os.path.join(directory, "index.json")) as file:
        document = json.load(file)
    assert document["aliases"] == {KEYS[0].hex(): KEYS[1].hex()}
    document["version"] = 1  # written before aliases: its states are still good
    del document["aliases"]
    with open(os.path.join(directory, "index.json"), "w") as file:
        json.dump(document, file)
    older = StateIndex(directory, "abcdef0123456789")
    assert list(older.entries()) == [KEYS[1]] and older.aliases() == {}


def test_the_slot_table_remembers_the_preamble_of_what_ran():
    table = SlotTable(2)
    table.ran(0, KEYS[:4], 500, preamble=2)
    assert table.content(0) == (KEYS[3], 500, frozenset(KEYS[:4]), KEYS[1])
    table.ran(0, KEYS[:2], 500, preamble=2)  # only the preamble: no shorter key to file it under
    table.ran(1, KEYS[:3], 500)
    assert table.content(0)[3] is None and table.content(1)[3] is None
    table.ran(1, KEYS[:3], 500, preamble=1)
    table.restored(1, KEYS[4], 300)  # another state now: the preamble of what ran before is not its
    assert table.content(1) == (KEYS[4], 300, frozenset({KEYS[4]}), None)
