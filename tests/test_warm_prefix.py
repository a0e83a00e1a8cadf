"""Prefix keys stay the same for one conversation from turn to turn, as real agents send it: Anthropic's
cache_control marker moves to the newest block every turn (llama.cpp never renders it), and a plain prompt that
grows keeps the keys of its whole parts."""
from service.warm.prefix import PROMPT_PART, preamble_length, prefix_keys

MARK = {"type": "ephemeral"}
TOOLS = [{"name": "read", "description": "Read a file.", "input_schema": {"type": "object"}},
         {"name": "write", "description": "Write a file.", "input_schema": {"type": "object"}}]


def block(text, marked=False) -> dict:
    """A text block, marked for Anthropic's prompt cache when marked."""
    return {"type": "text", "text": text, **({"cache_control": MARK} if marked else {})}


def claude_code_turn(*turns) -> dict:
    """A /v1/messages body as Claude Code sends it: tools, system blocks, and cache_control on the newest message
    (the last tool and the system prompt marked too)."""
    messages = [{"role": "user" if n % 2 == 0 else "assistant",
                 "content": [block(text, marked=n == len(turns) - 1)]} for n, text in enumerate(turns)]
    tools = [*TOOLS[:-1], {**TOOLS[-1], "cache_control": MARK}]
    return {"model": "a", "tools": tools, "system": [block("You are a coding agent."), block("Be brief.", True)],
            "messages": messages, "metadata": {"user_id": "u1"}, "max_tokens": 32000}


def test_the_moving_cache_control_marker_changes_no_key():
    first = prefix_keys(claude_code_turn("Fix the bug in main.py"))
    second = prefix_keys(claude_code_turn("Fix the bug in main.py", "Done: it was a typo.", "Now add a test"))
    assert len(first) == 3 and len(second) == 5  # tools, system, then each message
    assert second[:3] == first  # turn 2 names turn 1's saved state
    # Another message text is another key: only the marker is left out.
    assert prefix_keys(claude_code_turn("Fix the bug in util.py"))[2] != first[2]


def test_the_tools_are_part_of_the_prompt_and_unmarked_tools_key_alike():
    body = claude_code_turn("hello")
    other_tools = {**body, "tools": TOOLS[:1]}
    assert prefix_keys(other_tools)[0] != prefix_keys(body)[0]
    assert prefix_keys({**body, "tools": TOOLS}) == prefix_keys(body)
    without = prefix_keys({key: value for key, value in body.items() if key != "tools"})
    assert len(without) == 2 and not set(without) & set(prefix_keys(body))  # system, message: a chain of its own


def test_a_growing_plain_prompt_keeps_the_keys_of_its_whole_parts():
    prompt = "".join(f"walnut{n % 97} " for n in range(400))  # 3 whole parts and a partial one
    keys = prefix_keys({"prompt": prompt})
    assert len(keys) == len(prompt) // PROMPT_PART == 3
    assert prefix_keys({"prompt": prompt + " and more words here"}) == keys
    assert prefix_keys({"prompt": prompt + "x" * PROMPT_PART})[:3] == keys  # one whole part more: one key more
    assert prefix_keys({"prompt": "short"}) == []  # no whole part: nothing to name
    # A string input of the Responses API, after its instructions.
    responses = prefix_keys({"instructions": "Be brief.", "input": prompt})
    assert len(responses) == 4 and prefix_keys({"instructions": "Be brief.", "input": prompt + "!"}) == responses


def test_the_preamble_is_the_tools_and_system_prompt_that_new_sessions_send_again():
    first, other = claude_code_turn("Fix the bug in main.py"), claude_code_turn("Write a README", "Done.", "Thanks")
    assert preamble_length(first) == preamble_length(other) == 2  # tools, system
    assert prefix_keys(first)[:2] == prefix_keys(other)[:2] and prefix_keys(first)[2] != prefix_keys(other)[2]
    chat = [{"role": "system", "content": "You are an agent."}, {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "hello"}, {"role": "system", "content": "not leading: the session's own"}]
    assert preamble_length({"messages": chat}) == 2 and preamble_length({"messages": chat, "tools": TOOLS}) == 3
    # Codex: instructions and tools; its leading developer message is part of it too.
    codex = {"instructions": "You are Codex.", "tools": TOOLS,
             "input": [{"role": "developer", "content": "sandbox: none"}, {"role": "user", "content": "fix it"}]}
    assert preamble_length(codex) == 3 and len(prefix_keys(codex)) == 4
    assert preamble_length({"messages": chat[2:]}) == 0  # no system prompt: no preamble
    assert preamble_length({"instructions": "Be brief.", "input": "x" * 3 * PROMPT_PART}) == 1
    assert preamble_length({"prompt": "x" * 3 * PROMPT_PART}) == 0  # a plain prompt's parts are never one
    assert preamble_length({"messages": chat[:2]}) == 2 == len(prefix_keys({"messages": chat[:2]}))
