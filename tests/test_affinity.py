"""Cache-aware placement's table: prompt prefixes as a chain of hashes, and the replica that served the longest
known prefix, also when conversations share their first part (one system prompt for every user of an app)."""
from service.proxy.affinity import PROMPT_PART, AffinityTable, prefix_keys

SYSTEM = {"role": "system", "content": "You are the support assistant of one shop."}


def conversation(*turns) -> dict:
    """A chat body: the shared system prompt, then turns."""
    return {"model": "chat", "messages": [SYSTEM, *({"role": "user", "content": turn} for turn in turns)]}


def test_prefix_keys_are_a_chain_shared_up_to_where_the_prompts_diverge():
    first, second = prefix_keys(conversation("my parcel is late")), prefix_keys(conversation("a refund, please"))
    assert len(first) == len(second) == 2
    assert first[0] == second[0] and first[1] != second[1]  # the same system prompt, different first turns
    assert prefix_keys(conversation("my parcel is late", "it is still late"))[:2] == first  # the next turn extends it
    assert prefix_keys({"prompt": "x" * (2 * PROMPT_PART + 1)})[:1] == prefix_keys({"prompt": "x" * PROMPT_PART})


def test_the_longest_known_prefix_wins_over_a_shared_shorter_one():
    table = AffinityTable()
    table.remember(prefix_keys(conversation("my parcel is late")), "replica-a")
    # Another conversation with the same system prompt, served elsewhere: the shared first key now names b.
    table.remember(prefix_keys(conversation("a refund, please")), "replica-b")
    # Each conversation's next turn goes back to where its own earlier turns are cached, not to the last
    # replica that saw the system prompt.
    assert table.lookup(prefix_keys(conversation("my parcel is late", "it is still late"))) == "replica-a"
    assert table.lookup(prefix_keys(conversation("a refund, please", "for order 12"))) == "replica-b"
    # A new conversation knows only the system prompt: it goes where that was last served.
    assert table.lookup(prefix_keys(conversation("hello"))) == "replica-b"
    assert table.lookup(prefix_keys({"messages": [{"role": "user", "content": "no system prompt"}]})) is None


def test_the_least_recently_used_prefixes_are_forgotten_first():
    table = AffinityTable(size=2)
    old, new = prefix_keys(conversation("old")), prefix_keys(conversation("new"))
    table.remember(old, "replica-a")  # 2 keys: the system prompt, "old"
    table.remember(new, "replica-b")  # the system prompt again (now most recent), "new": "old" is dropped
    assert table.lookup(old[1:]) is None
    assert table.lookup(new) == "replica-b" and table.lookup(new[:1]) == "replica-b"


def test_prefix_keys_are_stable_chained_blake2b_so_every_process_names_a_prefix_alike():
    import hashlib

    first, second = prefix_keys(conversation("my parcel is late"))
    system = hashlib.blake2b(f"system\0{SYSTEM['content']}".encode(), digest_size=16).digest()
    assert first == system  # no per-process salt (Python's hash() has one): saved states are named by these
    assert second == hashlib.blake2b(system + "user\0my parcel is late".encode(), digest_size=16).digest()
