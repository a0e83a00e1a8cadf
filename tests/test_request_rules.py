"""A model's request rules (defaults, an output ceiling, strips) act alike on every API family's body."""
import json

import pytest

from service.errors import InvalidRequest
from service.proxy.request_rules import RequestRules, RuleError, apply

USER = [{"role": "user", "content": "hi"}]
# (llama-server path, a minimal body of that family, the field that family names its output limit)
FAMILIES = [
    pytest.param("/v1/chat/completions", {"model": "m", "messages": USER}, "max_tokens", id="chat"),
    pytest.param("/v1/completions", {"model": "m", "prompt": "hi"}, "max_tokens", id="completions"),
    pytest.param("/v1/responses", {"model": "m", "input": "hi"}, "max_output_tokens", id="responses"),
    pytest.param("/v1/messages", {"model": "m", "messages": USER}, "max_tokens", id="messages"),
]


def run(rules, body, path):
    """Apply rules to body as the client's bytes; check that the bytes sent say what the body says."""
    raw = json.dumps(body).encode()
    sent_raw, sent, lowered_from = apply(rules, raw, body, path)
    assert json.loads(sent_raw) == sent
    return sent_raw, sent, lowered_from


@pytest.mark.parametrize("path, body, limit", FAMILIES)
def test_a_default_fills_a_missing_field_and_the_clients_own_value_wins(path, body, limit):
    rules = RequestRules(defaults={"temperature": 0.7, "top_k": 20})
    _, sent, _ = run(rules, {**body, "top_k": 5}, path)
    assert (sent["temperature"], sent["top_k"]) == (0.7, 5)
    _, sent, _ = run(rules, {**body, "temperature": None}, path)  # null is "no value": the default's place
    assert sent["temperature"] == 0.7


@pytest.mark.parametrize("path, body, limit", FAMILIES)
def test_an_object_default_is_merged_into_the_clients_object(path, body, limit):
    rules = RequestRules(defaults={"chat_template_kwargs": {"enable_thinking": False, "style": {"a": 1, "b": 2}}})
    _, sent, _ = run(rules, body, path)
    assert sent["chat_template_kwargs"] == {"enable_thinking": False, "style": {"a": 1, "b": 2}}
    client = {"enable_thinking": True, "style": {"b": 9}, "extra": "x"}
    _, sent, _ = run(rules, {**body, "chat_template_kwargs": client}, path)
    assert sent["chat_template_kwargs"] == {"enable_thinking": True, "style": {"b": 9, "a": 1}, "extra": "x"}
    _, sent, _ = run(rules, {**body, "chat_template_kwargs": "raw"}, path)  # not an object: it wins whole
    assert sent["chat_template_kwargs"] == "raw"


@pytest.mark.parametrize("path, body, limit", FAMILIES)
def test_the_ceiling_lowers_a_larger_ask_and_reports_it(path, body, limit):
    _, sent, lowered_from = run(RequestRules(max_tokens=256), {**body, limit: 4096}, path)
    assert (sent[limit], lowered_from) == (256, 4096)


@pytest.mark.parametrize("path, body, limit", FAMILIES)
def test_the_ceiling_leaves_a_smaller_ask_alone(path, body, limit):
    asked = {**body, limit: 100}
    raw = json.dumps(asked).encode()
    assert apply(RequestRules(max_tokens=256), raw, asked, path) == (raw, asked, None)


@pytest.mark.parametrize("path, body, limit", FAMILIES)
def test_the_ceiling_applies_to_a_request_that_asks_for_no_limit(path, body, limit):
    _, sent, lowered_from = run(RequestRules(max_tokens=256), body, path)
    assert (sent[limit], lowered_from) == (256, None)


@pytest.mark.parametrize("path, body, limit", FAMILIES)
def test_the_ceiling_also_caps_the_fields_llama_cpp_reads_first(path, body, limit):
    # llama.cpp reads n_predict before max_completion_tokens before max_tokens: left alone, they would undo it.
    asked = {**body, limit: 10, "n_predict": -1, "max_completion_tokens": 9000}
    _, sent, _ = run(RequestRules(max_tokens=256), asked, path)
    assert (sent[limit], sent["n_predict"], sent["max_completion_tokens"]) == (10, 256, 256)


@pytest.mark.parametrize("asked, lowered_from", [
    ({"n_predict": -1, "max_tokens": 10}, -1),  # llama.cpp obeys n_predict first: it asked for no limit
    ({"n_predict": 10, "max_tokens": 9000}, None),  # capped all the same, but llama.cpp would have made 10
    ({"max_completion_tokens": 9000, "max_tokens": 10}, 9000),
])
def test_lowered_from_is_the_limit_llama_cpp_would_have_obeyed(asked, lowered_from):
    _, sent, reported = run(RequestRules(max_tokens=256), {"model": "m", "messages": USER, **asked},
                            "/v1/chat/completions")
    assert reported == lowered_from and all(sent[name] <= 256 for name in asked)


# The fields llama.cpp reads as the output limit, in the order it reads them, by path (written out here, not taken
# from the module under test).
READS = {"/v1/chat/completions": ("n_predict", "max_completion_tokens", "max_tokens"),
         "/v1/completions": ("n_predict", "max_completion_tokens", "max_tokens"),
         "/v1/responses": ("n_predict", "max_completion_tokens", "max_output_tokens", "max_tokens"),
         "/v1/messages": ("max_tokens", "n_predict", "max_completion_tokens")}


def obeyed(sent, path):
    """The output limit llama.cpp obeys in a body sent to path: the first field it reads that is a number."""
    return next((sent[name] for name in READS[path] if type(sent.get(name)) in (int, float)), None)


@pytest.mark.parametrize("path, body, limit", FAMILIES)
@pytest.mark.parametrize("default", [{"n_predict": 100000}, {"n_predict": -1}, {"max_completion_tokens": 100000},
                                     {"max_output_tokens": 100000}])
def test_a_default_naming_a_limit_field_is_capped_like_the_clients_own(path, body, limit, default):
    _, sent, lowered_from = run(RequestRules(defaults=default, max_tokens=100), body, path)
    assert 0 <= obeyed(sent, path) <= 100 and all(sent[name] <= 100 for name in default if name in READS[path])
    assert lowered_from is None  # the client asked for nothing: no cut to report


@pytest.mark.parametrize("path, body, limit", FAMILIES)
@pytest.mark.parametrize("bad", ["x", True, [5], {"n": 5}])
def test_a_limit_that_is_no_number_is_dropped_never_raised_to_the_ceiling(path, body, limit, bad):
    # llama.cpp skips it for the next field: set to the ceiling, it would obey 100 where it obeyed 50.
    first, second = READS[path][:2]
    asked = {**body, first: bad, second: 50}
    _, sent, _ = run(RequestRules(max_tokens=100), asked, path)
    assert first not in sent and obeyed(sent, path) == 50
    _, sent, _ = run(RequestRules(max_tokens=100), {**body, first: bad}, path)
    assert obeyed(sent, path) == 100  # nothing valid left: the ceiling is the limit


def test_lowered_from_skips_a_limit_llama_cpp_would_skip():
    asked = {"model": "m", "prompt": "hi", "n_predict": "x", "max_tokens": 9000}
    _, sent, lowered_from = run(RequestRules(max_tokens=100), asked, "/v1/completions")
    assert (sent["max_tokens"], lowered_from) == (100, 9000) and "n_predict" not in sent


@pytest.mark.parametrize("path, body, limit", FAMILIES)
def test_a_max_tokens_default_goes_to_the_familys_own_field_under_the_ceiling(path, body, limit):
    _, sent, _ = run(RequestRules(defaults={"max_tokens": 100}, max_tokens=256), body, path)
    assert sent[limit] == 100 and (limit == "max_tokens" or "max_tokens" not in sent)
    _, sent, _ = run(RequestRules(defaults={"max_tokens": 1000}, max_tokens=256), body, path)
    assert sent[limit] == 256
    _, sent, _ = run(RequestRules(defaults={"max_tokens": 100}), {**body, "n_predict": 50}, path)
    assert sent.get(limit) is None and sent["n_predict"] == 50  # the client sent a limit: the default stays out


@pytest.mark.parametrize("path, body, limit", FAMILIES)
def test_strip_removes_fields_and_strip_with_a_default_forces_it(path, body, limit):
    rules = RequestRules(strip=("logit_bias", "temperature"), defaults={"temperature": 0.2})
    _, sent, _ = run(rules, {**body, "logit_bias": {"1": 5}, "temperature": 2.0}, path)
    assert "logit_bias" not in sent and sent["temperature"] == 0.2


@pytest.mark.parametrize("path, body, limit", FAMILIES + [
    pytest.param("/v1/embeddings", {"model": "m", "input": "hi"}, None, id="embeddings")])
def test_no_rules_and_rules_that_change_nothing_pass_the_clients_bytes_as_they_came(path, body, limit):
    raw = json.dumps(body, indent=2).encode()
    for rules in (None, RequestRules(), RequestRules(strip=("logit_bias",))):  # nothing to strip
        sent_raw, sent, lowered_from = apply(rules, raw, body, path)
        assert sent_raw is raw and sent is body and lowered_from is None
    with_value = {**body, "top_k": 5, "chat_template_kwargs": {"a": 1}}
    raw = json.dumps(with_value).encode()
    rules = RequestRules(defaults={"top_k": 20, "chat_template_kwargs": {"a": 2}})
    assert apply(rules, raw, with_value, path)[0] is raw


def test_endpoints_without_an_output_limit_take_defaults_and_strips_but_no_ceiling():
    body = {"model": "m", "input": "hi", "dimensions": 8}
    rules = RequestRules(defaults={"embd_normalize": 2, "max_tokens": 50}, strip=("dimensions",), max_tokens=256)
    _, sent, lowered_from = run(rules, body, "/v1/embeddings")
    assert sent == {"model": "m", "input": "hi", "embd_normalize": 2} and lowered_from is None


def test_infill_caps_llama_cpps_own_n_predict():
    _, sent, lowered_from = run(RequestRules(max_tokens=64), {"input_prefix": "a", "n_predict": -1}, "/infill")
    assert (sent["n_predict"], lowered_from) == (64, -1)
    _, sent, _ = run(RequestRules(max_tokens=64), {"input_prefix": "a", "n_predict": True}, "/infill")
    assert sent["n_predict"] == 64  # not a count: llama.cpp would fall back to no limit


def test_the_clients_body_is_never_changed_in_place():
    body = {"model": "m", "chat_template_kwargs": {"a": 1}, "logit_bias": {}}
    before = json.loads(json.dumps(body))
    rules = RequestRules(defaults={"chat_template_kwargs": {"b": {"c": 1}}}, strip=("logit_bias",), max_tokens=5)
    _, sent, _ = run(rules, body, "/v1/chat/completions")
    sent["chat_template_kwargs"]["b"]["c"] = 2  # nor do the rules' own objects travel with a request
    assert body == before and rules.defaults["chat_template_kwargs"] == {"b": {"c": 1}}


def test_unicode_survives_reencoding_as_compact_utf8():
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo 世界 🦙 \u2028"}]}
    sent_raw, _, _ = run(RequestRules(defaults={"temperature": 0.5}), body, "/v1/chat/completions")
    assert "héllo 世界 🦙 \u2028".encode() in sent_raw and b", " not in sent_raw and b'": ' not in sent_raw


def test_a_lone_surrogate_goes_back_escaped_as_the_client_sent_it():
    raw = b'{"model":"m","prompt":"a\\ud800b"}'
    sent_raw, sent, _ = apply(RequestRules(max_tokens=5), raw, json.loads(raw), "/v1/completions")
    assert b"\\ud800" in sent_raw and sent["prompt"] == "a\ud800b" and json.loads(sent_raw) == sent


def test_a_number_json_cannot_carry_back_is_a_400():
    raw = b'{"model":"m","prompt":"hi","temperature":1e999}'
    with pytest.raises(InvalidRequest, match="too large"):
        apply(RequestRules(max_tokens=5), raw, json.loads(raw), "/v1/completions")


@pytest.mark.parametrize("settings, where, words", [
    ({"defaults": {"model": "x"}}, ("defaults", "model"), "'model'"),
    ({"strip": ["stream"]}, ("limits", "strip"), "'stream'"),
    ({"strip": "logit_bias"}, ("limits", "strip"), "list of field names"),
    ({"max_tokens": 0}, ("limits", "max_tokens"), "1 or more"),
    ({"max_tokens": True}, ("limits", "max_tokens"), "1 or more"),
    ({"defaults": {"max_tokens": "many"}}, ("defaults", "max_tokens"), "1 or more"),
    ({"defaults": {"temperature": float("inf")}}, ("defaults",), "not a JSON value"),
])
def test_bad_rules_are_refused_when_made_naming_their_key(settings, where, words):
    with pytest.raises(RuleError, match=words) as raised:
        RequestRules(**settings)
    assert raised.value.where == where and str(raised.value).startswith(".".join(where) + ": ")
