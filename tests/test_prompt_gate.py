"""The submission-time prompt gate (nodes/prompt_guard.py on_prompt), issue 12: wrapped and
nested widget values are read (4a), a negative is negative only at a literal cfg above 1 (4d),
one submission is bounded and audited once (9), a refusal never says why (10), and widgets
that are not prompts are not prompt-checked (15). The engine is the double of
test_comfy_prompt_guard.py (blocks "forbiddenword"); one test uses the real engine."""
from __future__ import annotations

import json
import sys
import time
import types

import pytest

from consent_guard.audit import AuditLog, read_records
from consent_guard.verdict import Decision, Reason, Verdict
from test_comfy_prompt_guard import (  # noqa: F401 (comfy, engine, guard: fixtures)
    PromptEngine, comfy, custom_sampler, engine, guard, primitives, refusal_messages, submit,
    txt2img)

BAD = "a forbiddenword portrait"


def refused_nodes(guard, prompt) -> list:
    out = submit(guard, prompt)
    if out["prompt"] is prompt:
        return []
    return sorted(refusal_messages(guard, out))


@pytest.fixture
def audited(guard, engine, tmp_path):
    """The engine double with a real audit log; returns a reader of its records."""
    engine.audit = AuditLog(tmp_path / "audit.log")
    engine.policy = types.SimpleNamespace(enforce=False)
    return lambda: list(read_records(tmp_path / "audit.log"))


# -- 4a: wrapped, nested and dict values ------------------------------------------------------

@pytest.mark.parametrize("value", [
    {"__value__": BAD},
    {"__value__": {"__value__": BAD}},  # unwrapped once; the node gets str() of the rest
    {"__value__": ["a portrait", {"style": BAD}]},
    {"any": {"deeper": [1, 2, [BAD]]}},
    {"forbiddenword": 1},  # a key: str() of a dict shows it to the encoder
    {"__value__": {"forbiddenword": "x"}},
])
def test_wrapped_and_nested_strings_are_read(guard, engine, value):
    g = txt2img()
    g["6"]["inputs"]["text"] = value
    assert refused_nodes(guard, g) == ["6"]


def test_wrapped_strings_through_primitives_and_concatenation(guard, engine):
    g = primitives({"__value__": "forbid"}, {"__value__": "denword"}, {"__value__": ""})
    assert refused_nodes(guard, g) == ["6"]  # the joined text, as StringConcatenate makes it
    g = primitives({"__value__": "a portrait"}, {"__value__": "in the rain"})
    assert refused_nodes(guard, g) == []
    assert ("a portrait, in the rain", "blurry") in engine.calls


def test_input_text_follows_validate_inputs(guard):
    input_text = guard.input_text
    assert input_text("abc") == "abc" and input_text({"__value__": "abc"}) == "abc"
    for no_text in (5, 8.0, True, None, {"__value__": 7}, [1, 2], {}):
        assert input_text(no_text) is None
    text = input_text({"__value__": {"k": ["a", {"b": "c"}]}})
    assert text.splitlines()[0] == str({"k": ["a", {"b": "c"}]})  # what a STRING input gets
    assert text.splitlines()[1:] == ["k", "a", "b", "c"]  # and each string as it is


def test_deeply_nested_value_is_read_without_recursion(guard, engine):
    deep = BAD
    for _ in range(50_000):
        deep = [deep]
    g = txt2img()
    g["6"]["inputs"]["text"] = {"__value__": deep}
    assert refused_nodes(guard, g) == ["6"]


def test_numbers_and_links_are_not_text(guard, engine):
    g = txt2img()
    g["3"]["inputs"]["seed"] = {"__value__": 12345}
    g["3"]["inputs"]["cfg"] = {"__value__": 8.0}
    assert refused_nodes(guard, g) == []
    checked = {text for text, _ in engine.calls}
    assert checked == {"beautiful scenery nature glass bottle landscape",
                       "v1-5-pruned-emaonly.safetensors"}


# -- 4d: negative only where the sampler pushes away from it -----------------------------------

def negative_is_bad(cfg, sampler="KSampler", **extra) -> dict:
    g = txt2img("a quiet harbour", BAD)
    g["3"]["class_type"] = sampler
    g["3"]["inputs"]["cfg"] = cfg
    g["3"]["inputs"].update(extra)
    return g


@pytest.mark.parametrize("cfg", [0, 0.0, 1, 1.0, "1.0", {"__value__": 1.0}, ["10", 0],
                                 "NaN", "lots", None, True])
def test_negative_at_cfg_up_to_1_or_unknown_is_checked(guard, engine, cfg):
    g = negative_is_bad(cfg)
    g["10"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 0.0}}
    assert refused_nodes(guard, g) == ["7"]


@pytest.mark.parametrize("cfg", [8, 8.0, 1.01, "7.5", {"__value__": 8.0}])
def test_negative_at_a_literal_cfg_above_1_is_context(guard, engine, cfg):
    assert refused_nodes(guard, negative_is_bad(cfg)) == []
    assert all(negative == BAD for _, negative in engine.calls)


def test_ksampler_advanced_and_sampler_custom(guard, engine):
    for sampler in ("KSamplerAdvanced", "SamplerCustom"):
        assert refused_nodes(guard, negative_is_bad(0.5, sampler)) == ["7"]
        assert refused_nodes(guard, negative_is_bad(6.0, sampler)) == []


def test_unknown_sampler_with_a_negative_is_strict(guard, engine):
    assert refused_nodes(guard, negative_is_bad(8.0, "SomeCustomSampler")) == ["7"]


def test_cfg_pp_sampler_follows_the_negative(guard, engine):
    assert refused_nodes(guard, negative_is_bad(8.0, sampler_name="euler_cfg_pp")) == ["7"]
    g = custom_sampler("a lighthouse", BAD)
    assert refused_nodes(guard, g) == []
    g["33"]["inputs"]["sampler_name"] = "euler_ancestral_cfg_pp"
    assert refused_nodes(guard, g) == ["7"]


@pytest.mark.parametrize("cfg,refused", [(8.0, []), (1.0, ["7"]), (["40", 0], ["7"])])
def test_cfg_guider(guard, engine, cfg, refused):
    g = custom_sampler("a lighthouse", BAD)
    g["30"]["inputs"]["cfg"] = cfg
    assert refused_nodes(guard, g) == refused


def test_basic_guider_has_no_negative(guard, engine):
    g = custom_sampler("a lighthouse", BAD)
    g["30"] = {"class_type": "BasicGuider", "inputs": {"model": ["4", 0],
                                                      "conditioning": ["7", 0]}}
    assert refused_nodes(guard, g) == ["7"]


@pytest.mark.parametrize("cfg_cond2_negative,refused", [(8.0, []), (1.0, ["7"]), (0.0, ["7"])])
def test_dual_cfg_guider(guard, engine, cfg_cond2_negative, refused):
    """Guider_DualCFG: the negative weighs 1 - cfg_cond2_negative; cond2 is always followed."""
    g = custom_sampler("a lighthouse", BAD)
    g["41"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "sunset", "clip": ["4", 1]}}
    g["30"] = {"class_type": "DualCFGGuider", "inputs": {
        "model": ["4", 0], "cond1": ["6", 0], "cond2": ["41", 0], "negative": ["7", 0],
        "cfg_conds": 8.0, "cfg_cond2_negative": cfg_cond2_negative, "style": "regular"}}
    assert refused_nodes(guard, g) == refused
    g["41"]["inputs"]["text"] = BAD
    g["30"]["inputs"]["negative"] = ["6", 0]
    assert "41" in refused_nodes(guard, g)


def test_perp_neg_guider_needs_both_scales(guard, engine):
    g = custom_sampler("a lighthouse", BAD)
    g["30"] = {"class_type": "PerpNegGuider", "inputs": {
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
        "empty_conditioning": ["6", 0], "cfg": 8.0, "neg_scale": 1.0}}
    assert refused_nodes(guard, g) == []
    g["30"]["inputs"]["neg_scale"] = 0.0
    assert refused_nodes(guard, g) == ["7"]


def test_pass_through_keeps_the_sampler_cfg(guard, engine):
    """Through ControlNetApplyAdvanced the negative is negative at cfg 8 and checked at 0."""
    from test_comfy_prompt_guard import combined

    g = combined()
    g["12"]["inputs"]["conditioning"] = ["7", 0]
    g["7"]["inputs"]["text"] = BAD
    assert refused_nodes(guard, g) == []
    g["3"]["inputs"]["cfg"] = 0.0
    assert refused_nodes(guard, g) == ["7"]


def test_pass_through_found_by_output_names(guard, engine, monkeypatch):
    """With ComfyUI's class list, any class whose outputs are named like its role inputs is
    followed (here a made-up one); a class that takes a negative and returns other things is
    strict."""
    class CarriesThrough:
        RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
        RETURN_NAMES = ("positive", "negative", "latent")

    class Swallows:
        RETURN_TYPES = ("CONDITIONING",)

    fake = types.ModuleType("nodes")
    fake.NODE_CLASS_MAPPINGS = {"CarriesThrough": CarriesThrough, "Swallows": Swallows}
    monkeypatch.setitem(sys.modules, "nodes", fake)
    g = txt2img("a quiet harbour", BAD)
    g["50"] = {"class_type": "CarriesThrough", "inputs": {"positive": ["6", 0],
                                                         "negative": ["7", 0]}}
    g["3"]["inputs"].update(positive=["50", 0], negative=["50", 1])
    assert guard.node_roles(g)["7"] == "negative"
    assert refused_nodes(guard, g) == []
    g["50"]["class_type"] = "Swallows"
    g["3"]["inputs"].update(positive=["6", 0], negative=["50", 0])
    assert guard.node_roles(g)["7"] == "positive"
    assert refused_nodes(guard, g) == ["7"]


def test_text_reaching_a_negative_and_anything_else_is_positive(guard, engine):
    """Negative only where it reaches nothing but negatives: a link into anything else (here
    an unknown node's conditioning input, through a combiner) makes it positive."""
    g = negative_is_bad(8.0)
    g["60"] = {"class_type": "ConditioningCombine",
               "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["7", 0]}}
    g["61"] = {"class_type": "SomeCustomNode", "inputs": {"conditioning": ["60", 0]}}
    assert guard.node_roles(g)["7"] == "positive"
    assert refused_nodes(guard, g) == ["7"]
    g["61"]["inputs"]["conditioning"] = "none"  # the combiner feeds nothing: still strict
    assert refused_nodes(guard, g) == ["7"]
    g["62"] = {"class_type": "KSampler", "inputs": {"cfg": 7.0, "positive": ["6", 0],
                                                   "negative": ["60", 0]}}
    assert guard.node_roles(g)["7"] == "negative"  # every way out of it is a negative
    assert guard.node_roles(g)["6"] == "positive"
    assert refused_nodes(guard, g) == []


# -- 9: bounded, one check per distinct text, one audit record --------------------------------

def many_primitives(n, text=lambda i: "a quiet harbour") -> dict:
    g = txt2img()
    for i in range(n):
        g[str(1000 + i)] = {"class_type": "PrimitiveStringMultiline",
                            "inputs": {"value": text(i)}}
    return g


def test_identical_texts_are_checked_once_and_audited_once(guard, engine, audited):
    assert refused_nodes(guard, many_primitives(3000)) == []
    assert sorted(text for text, _ in engine.calls) == [
        "a quiet harbour", "beautiful scenery nature glass bottle landscape",
        "v1-5-pruned-emaonly.safetensors"]
    [rec] = audited()
    assert rec["kind"] == "prompt" and rec["decision"] == "allow" and rec["client_id"] == "c"
    assert "3003 texts, 3 distinct checked" in rec["note"]


def test_too_many_distinct_texts_are_refused_unchecked(guard, engine, audited):
    n = guard.MAX_TEXTS + 1
    start = time.perf_counter()
    out = submit(guard, many_primitives(3000, lambda i: f"harbour {i}"))
    assert time.perf_counter() - start < 5
    [(key, message)] = refusal_messages(guard, out).items()
    assert key == guard.WHOLE_PROMPT and engine.calls == []
    assert f"at most {guard.MAX_TEXTS} different texts" in message
    assert "nothing was queued" in message and "3002 texts" in message
    [rec] = audited()
    assert rec["decision"] == "block" and "at most" in rec["note"]
    assert refused_nodes(guard, many_primitives(n - 3, lambda i: f"harbour {i}")) == []


def test_too_many_characters_are_refused(guard, engine):
    g = txt2img("harbour " * (guard.MAX_CHARS // 8 + 1))
    messages = refusal_messages(guard, submit(guard, g))
    assert f"{guard.MAX_CHARS} characters" in messages[guard.WHOLE_PROMPT]
    assert engine.calls == []


def test_doubling_concatenations_are_bounded(guard, engine):
    """Each StringConcatenate joins the previous one with itself: 2**60 characters unless
    the built text is bounded."""
    g = txt2img()
    g["100"] = {"class_type": "PrimitiveString", "inputs": {"value": "ab"}}
    for i in range(101, 161):
        g[str(i)] = {"class_type": "StringConcatenate", "inputs": {
            "string_a": [str(i - 1), 0], "string_b": [str(i - 1), 0], "delimiter": ""}}
    g["6"]["inputs"]["text"] = ["160", 0]
    start = time.perf_counter()
    messages = refusal_messages(guard, submit(guard, g))
    assert time.perf_counter() - start < 5
    assert "at most" in messages[guard.WHOLE_PROMPT] and engine.calls == []


def test_long_chains_are_bounded_and_resolved_once(guard, engine):
    g = txt2img()
    g["100"] = {"class_type": "PrimitiveString", "inputs": {"value": "forbid"}}
    for i in range(101, 101 + 150):
        g[str(i)] = {"class_type": "StringConcatenate", "inputs": {
            "string_a": [str(i - 1), 0], "string_b": "denword" if i == 101 else "",
            "delimiter": ""}}
    g["6"]["inputs"]["text"] = ["250", 0]
    assert refused_nodes(guard, g) == ["6"]
    for i in range(251, 101 + guard.MAX_CHAIN + 1):
        g[str(i)] = {"class_type": "StringConcatenate", "inputs": {
            "string_a": [str(i - 1), 0], "string_b": "", "delimiter": ""}}
    g["6"]["inputs"]["text"] = [str(100 + guard.MAX_CHAIN + 1), 0]
    messages = refusal_messages(guard, submit(guard, g))
    assert f"at most {guard.MAX_CHAIN} string nodes" in messages[guard.WHOLE_PROMPT]


def test_many_samplers_on_one_long_chain_are_walked_once(guard, engine):
    """Roles: one walk per role, not one per sampler (3000 x 3000 would hold the server)."""
    g = txt2img()
    prev = "6"
    for i in range(3000):
        g[str(5000 + i)] = {"class_type": "ConditioningCombine", "inputs": {
            "conditioning_1": [prev, 0], "conditioning_2": ["7", 0]}}
        prev = str(5000 + i)
    for i in range(3000):
        g[str(9000 + i)] = {"class_type": "KSampler", "inputs": {
            "cfg": 8.0, "positive": [str(5000 + i), 0], "negative": ["7", 0]}}
    start = time.perf_counter()
    roles = guard.node_roles(g)
    assert time.perf_counter() - start < 5
    assert roles["6"] == "positive" and roles["7"] == "positive"


def test_refused_submission_is_one_record_with_the_places(guard, engine, audited):
    g = txt2img(BAD)
    g["10"] = {"class_type": "CLIPTextEncode", "inputs": {"text": BAD, "clip": ["4", 1]}}
    assert refused_nodes(guard, g) == ["10", "6"]
    assert [text for text, _ in engine.calls].count(BAD) == 1
    [rec] = audited()
    assert rec["decision"] == "block" and rec["categories"] == ["sexual_explicit"]
    assert "node 6 (CLIPTextEncode), input 'text': sexual_explicit" in rec["note"]
    assert "node 10 (CLIPTextEncode)" in rec["note"]
    assert BAD not in json.dumps(rec)  # prompts are hashed by default


# -- 10: a refusal never says why ----------------------------------------------------------------

def test_protected_name_refusal_reads_like_any_other(guard, monkeypatch, audited, engine):
    explicit = refusal_messages(guard, submit(guard, txt2img(BAD)))
    assert audited()[-1]["categories"] == ["sexual_explicit"]

    def named(text, negative=None):
        engine.calls.append((text, negative))
        if "Jane Example" in text:
            return Verdict(Decision.BLOCK, (
                Reason("prompt_identity", "id-7f3a", 1.0, "protected_identity", Decision.BLOCK),
                Reason("prompt_lexicon", "lingerie", 1.0, "sexual_suggestive", Decision.ALLOW)),
                rule="prompt: protected_identity -> block (always)")
        return Verdict(Decision.ALLOW)

    monkeypatch.setattr(engine, "check_prompt", named)
    named_out = refusal_messages(guard, submit(guard, txt2img("Jane Example in lingerie")))
    assert named_out == explicit  # word for word: nothing tells who is enrolled
    rec = audited()[-1]
    assert rec["categories"] == ["protected_identity", "sexual_suggestive"]
    assert rec["identities"] == ["id-7f3a"]
    assert "a protected person named in a sexual prompt" in rec["note"]
    assert refused_nodes(guard, txt2img("John Other in lingerie")) == []


def test_check_prompt_node_refusal_reads_like_any_other(comfy, guard, monkeypatch):
    node = comfy.NODE_CLASS_MAPPINGS["ConsentGuardCheckPrompt"]()
    messages = {}
    for category in ("protected_identity", "sexual_explicit", "minor_sexual"):
        monkeypatch.setattr(guard, "get_engine", lambda: PromptEngine(category=category))
        with pytest.raises(guard.ConsentGuardError) as err:
            node.check("forbiddenword " + category)
        messages[category] = str(err.value)
    # a protected name reads word for word like a sexual prompt; the minors rule may differ
    assert messages["protected_identity"] == messages["sexual_explicit"]
    assert "sexual content" in messages["sexual_explicit"]
    assert "protected" not in messages["protected_identity"]


# -- 15: widgets that are not prompts ------------------------------------------------------------

README_OVERRIDE = '[actions] nudity = "block"'


def test_policy_override_and_file_names_are_not_prompts(guard, engine):
    g = txt2img()
    g["9"] = {"class_type": "ConsentGuardSaveImage", "inputs": {
        "images": ["8", 0], "filename_prefix": "forbiddenword",
        "policy_override": "[actions]\nforbiddenword = 'block'"}}
    g["20"] = {"class_type": "ConsentGuardCheckImage", "inputs": {
        "images": ["8", 0], "policy_override": {"__value__": "forbiddenword"}}}
    g["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0],
                                                     "filename_prefix": "forbiddenword"}}
    g["22"] = {"class_type": "LoadImage", "inputs": {"image": "forbiddenword.png"}}
    g["23"] = {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["22", 0],
                                                            "filename_prefix": "forbiddenword"}}
    assert refused_nodes(guard, g) == []
    assert not any("forbiddenword" in text for text, _ in engine.calls)


def test_same_input_names_on_unknown_classes_are_checked(guard, engine):
    g = txt2img()
    g["30"] = {"class_type": "SomePromptNode", "inputs": {"policy_override": "forbiddenword"}}
    g["31"] = {"class_type": "OtherPromptNode", "inputs": {"filename_prefix": "forbiddenword"}}
    g["32"] = {"class_type": "ThirdNode", "inputs": {"image": "forbiddenword.png"}}
    g["33"] = {"class_type": "FourthNode", "inputs": {"sampler_name": "forbiddenword"}}
    g["34"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "a",
                                                     "caption": "forbiddenword"}}
    assert refused_nodes(guard, g) == ["30", "31", "32", "33", "34"]


def test_model_file_names_stay_checked(guard, engine):
    g = txt2img()
    g["4"]["inputs"]["ckpt_name"] = "forbiddenword.safetensors"
    assert refused_nodes(guard, g) == ["4"]


def test_string_node_feeding_only_a_policy_override_is_not_a_prompt(guard, engine):
    g = txt2img()
    g["9"] = {"class_type": "ConsentGuardSaveImage", "inputs": {
        "images": ["8", 0], "filename_prefix": ["41", 0], "policy_override": ["40", 0]}}
    g["40"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "forbiddenword"}}
    g["41"] = {"class_type": "StringConcatenate", "inputs": {
        "string_a": ["40", 0], "string_b": "forbiddenword", "delimiter": "_"}}
    assert refused_nodes(guard, g) == []
    g["6"]["inputs"]["text"] = ["41", 0]  # now it also reaches a text encoder
    assert refused_nodes(guard, g) == ["40", "41", "6"]


def test_readme_override_example_with_the_real_engine(comfy, guard, tmp_path):
    """The real engine blocks the README's policy_override example as a prompt; in a Consent
    Guard node's policy_override it is queued, and the same words as a prompt are refused."""
    from consent_guard.engine import Engine

    assert not Engine().check_prompt(README_OVERRIDE).allowed
    g = txt2img("a quiet harbour at dawn")
    g["9"] = {"class_type": "ConsentGuardSaveImage", "inputs": {
        "images": ["8", 0], "filename_prefix": "ComfyUI", "policy_override": README_OVERRIDE}}
    assert refused_nodes(guard, g) == []
    g["6"]["inputs"]["text"] = README_OVERRIDE
    assert refused_nodes(guard, g) == ["6"]


def test_unwritable_audit_in_enforce_mode_refuses(guard, engine, audited, monkeypatch):
    """One record per submission, and in enforce mode nothing is queued unlogged."""
    engine.policy.enforce = True
    monkeypatch.setattr(engine.audit, "record", lambda *a, **k: False)
    engine.audit.last_error = "audit log: No space left on device"
    messages = refusal_messages(guard, submit(guard, txt2img()))
    assert "cannot write its audit log" in messages[guard.WHOLE_PROMPT]
    assert "Nothing was queued" in messages[guard.WHOLE_PROMPT]
    engine.policy.enforce = False
    assert refused_nodes(guard, txt2img()) == []  # outside enforce mode it is queued
