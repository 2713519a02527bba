"""The prompt guard (nodes/prompt_guard.py) against the ComfyUI stand-ins: which texts of an
API-format prompt are checked and in which role, how a refused submission is turned into one
ComfyUI's validate_prompt fails, and the ConsentGuardCheckPrompt node. The engine is a double
that blocks any text containing "forbiddenword"; the real ComfyUI and the real prompt check
are exercised by tests/test_comfyui_integration.py."""
from __future__ import annotations

import copy
import sys
import types

import pytest

import comfy_standins
from consent_guard.verdict import Decision, Reason, Verdict

PKG = "custom_nodes_consent_guard_under_test"


class PromptEngine:
    """check_prompt(text, negative=None) -> Verdict: blocks "forbiddenword"."""

    def __init__(self, category="sexual_explicit", label="forbiddenword"):
        self.calls = []
        self.category, self.label = category, label

    def check_prompt(self, text, negative=None):
        self.calls.append((text, negative))
        if "forbiddenword" in text.lower():
            return Verdict(Decision.BLOCK, (Reason("lexicon", self.label, 1.0, self.category,
                                                   Decision.BLOCK),), rule="test rule")
        return Verdict(Decision.ALLOW)


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "home"))
    pkg = comfy_standins.install(monkeypatch, tmp_path / "comfy")
    yield pkg
    for key in [k for k in sys.modules if k.startswith(PKG)]:
        del sys.modules[key]


@pytest.fixture
def guard(comfy):
    return sys.modules[PKG + ".nodes.prompt_guard"]


@pytest.fixture
def engine(guard, monkeypatch):
    double = PromptEngine()
    monkeypatch.setattr(guard, "get_engine", lambda: double)
    return double


# -- workflows (API format, as the front end's graphToPrompt sends them) ----------------------

def txt2img(positive="beautiful scenery nature glass bottle landscape",
            negative="text, watermark") -> dict:
    """ComfyUI's default workflow."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 156680208700286, "steps": 20, "cfg": 8.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
            "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI",
                                                    "images": ["8", 0]}},
    }


def combined() -> dict:
    """Two positive encoders combined, the negative through ConditioningSetArea, both through
    ControlNetApplyAdvanced (outputs positive, negative), and a LoRA on the way."""
    g = txt2img("a castle", "blurry")
    g["10"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a dragon", "clip": ["16", 1]}}
    g["11"] = {"class_type": "ConditioningCombine",
               "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["10", 0]}}
    g["12"] = {"class_type": "ConditioningSetArea", "inputs": {
        "conditioning": ["7", 0], "width": 64, "height": 64, "x": 0, "y": 0, "strength": 1.0}}
    g["13"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["11", 0], "negative": ["12", 0], "control_net": ["14", 0],
        "image": ["15", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    g["14"] = {"class_type": "ControlNetLoader",
               "inputs": {"control_net_name": "control_canny.safetensors"}}
    g["15"] = {"class_type": "LoadImage", "inputs": {"image": "pose.png"}}
    g["16"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["4", 0], "clip": ["4", 1], "lora_name": "watercolor.safetensors",
        "strength_model": 1.0, "strength_clip": 1.0}}
    for enc in ("6", "7"):
        g[enc]["inputs"]["clip"] = ["16", 1]
    g["3"]["inputs"].update(model=["16", 0], positive=["13", 0], negative=["13", 1])
    return g


def primitives(part_a="a portrait", part_b="in the rain", delimiter=", ",
               negative="blurry") -> dict:
    """PrimitiveStringMultiline -> StringConcatenate -> CLIPTextEncode (positive), and
    PrimitiveString -> CLIPTextEncode (negative)."""
    g = txt2img()
    g["20"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": part_a}}
    g["21"] = {"class_type": "StringConcatenate", "inputs": {
        "string_a": ["20", 0], "string_b": part_b, "delimiter": delimiter}}
    g["22"] = {"class_type": "PrimitiveString", "inputs": {"value": negative}}
    g["6"]["inputs"]["text"] = ["21", 0]
    g["7"]["inputs"]["text"] = ["22", 0]
    return g


def custom_sampler(positive="a lighthouse", negative="lowres") -> dict:
    """SamplerCustomAdvanced with CFGGuider (comfy_extras/nodes_custom_sampler.py)."""
    g = txt2img(positive, negative)
    del g["3"]
    g["30"] = {"class_type": "CFGGuider", "inputs": {
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "cfg": 8.0}}
    g["31"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["32", 0], "guider": ["30", 0], "sampler": ["33", 0], "sigmas": ["34", 0],
        "latent_image": ["5", 0]}}
    g["32"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}}
    g["33"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["34"] = {"class_type": "BasicScheduler", "inputs": {
        "model": ["4", 0], "scheduler": "simple", "steps": 20, "denoise": 1.0}}
    g["8"]["inputs"]["samples"] = ["31", 0]
    return g


def by_place(texts):
    return {(t.node_id, t.input_name): (t.text, t.role) for t in texts}


# -- collection and roles ---------------------------------------------------------------------

def test_default_txt2img(guard):
    assert by_place(guard.collect_prompt_texts(txt2img())) == {
        ("6", "text"): ("beautiful scenery nature glass bottle landscape", "positive"),
        ("7", "text"): ("text, watermark", "negative"),
        ("4", "ckpt_name"): ("v1-5-pruned-emaonly.safetensors", "unknown"),
    }  # sampler_name and scheduler are choices, not text; numbers are not strings; a saver's
    # filename_prefix never reaches a text encoder


def test_combiners_and_controlnet_keep_roles(guard):
    texts = by_place(guard.collect_prompt_texts(combined()))
    assert texts[("6", "text")] == ("a castle", "positive")
    assert texts[("10", "text")] == ("a dragon", "positive")
    assert texts[("7", "text")] == ("blurry", "negative")  # through SetArea and ControlNet
    # loaders sit behind model/clip/image inputs: never negative, so always checked
    assert texts[("16", "lora_name")] == ("watercolor.safetensors", "unknown")
    assert texts[("14", "control_net_name")][1] == "unknown"
    assert ("15", "image") not in texts  # an image's file name is not a prompt


def test_primitive_strings_are_resolved_through_links(guard):
    texts = guard.collect_prompt_texts(primitives())
    places = by_place(texts)
    assert places[("20", "value")] == ("a portrait", "positive")
    assert places[("21", "string_b")] == ("in the rain", "positive")
    assert places[("6", "text")] == ("a portrait, in the rain", "positive")  # as StringConcatenate
    assert places[("22", "value")] == ("blurry", "negative")
    assert places[("7", "text")] == ("blurry", "negative")
    assert not any(t.runtime for t in texts)


def test_strings_computed_at_run_time_are_marked(guard):
    g = primitives()
    g["23"] = {"class_type": "SomePromptGenerator", "inputs": {"seed": 3}}
    g["21"]["inputs"]["string_b"] = ["23", 0]
    [text] = [t for t in guard.collect_prompt_texts(g) if t.node_id == "6"]
    assert text.text == "a portrait, " and text.runtime and text.role == "positive"


def test_custom_sampler_with_cfg_guider(guard):
    texts = by_place(guard.collect_prompt_texts(custom_sampler()))
    assert texts[("6", "text")] == ("a lighthouse", "positive")
    assert texts[("7", "text")] == ("lowres", "negative")
    assert ("33", "sampler_name") not in texts and ("34", "scheduler") not in texts


def test_text_used_as_positive_and_negative_is_positive(guard):
    g = txt2img()
    g["3"]["inputs"]["negative"] = ["6", 0]
    texts = by_place(guard.collect_prompt_texts(g))
    assert texts[("6", "text")][1] == "positive"
    assert texts[("7", "text")][1] == "unknown"  # connected to nothing: checked like a positive


def test_class_mappings_refine_choices_and_string_outputs(guard, monkeypatch):
    """With ComfyUI's nodes.NODE_CLASS_MAPPINGS: a value picked from a fixed list is skipped
    unless it is a model file, and a STRING output of any class is a string link."""
    class LoadImage:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": (["pose.png", "t1.jpg"], {"image_upload": True})}}
        RETURN_TYPES = ("IMAGE", "MASK")

    class LoraLoader:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"lora_name": ("COMBO", {"options": ["watercolor.safetensors"]}),
                                 "mode": ("COMBO", {"options": ["fast", "slow"]})}}
        RETURN_TYPES = ("MODEL", "CLIP")

    class Generator:
        RETURN_TYPES = ("STRING",)

    fake = types.ModuleType("nodes")
    fake.NODE_CLASS_MAPPINGS = {"LoadImage": LoadImage, "LoraLoader": LoraLoader,
                                "SomePromptGenerator": Generator}
    monkeypatch.setitem(sys.modules, "nodes", fake)
    g = combined()
    g["16"]["inputs"]["mode"] = "fast"
    g["23"] = {"class_type": "SomePromptGenerator", "inputs": {}}
    g["10"]["inputs"]["text"] = ["23", 0]
    texts = by_place(guard.collect_prompt_texts(g))
    assert ("15", "image") not in texts and ("16", "mode") not in texts
    assert texts[("16", "lora_name")] == ("watercolor.safetensors", "unknown")
    assert texts[("10", "text")] == ("", "positive")
    assert [t.runtime for t in guard.collect_prompt_texts(g) if t.node_id == "10"] == [True]


def test_malformed_prompts_do_not_break_collection(guard):
    g = {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": ["99", 0]}},
         "2": {"inputs": {"text": "no class"}}, "3": "junk", "4": {"class_type": "X"},
         "5": {"class_type": "KSampler", "inputs": {"positive": ["5", 0], "negative": [1]}}}
    assert by_place(guard.collect_prompt_texts(g)) == {("2", "text"): ("no class", "unknown")}


# -- the on-prompt handler --------------------------------------------------------------------

def submit(guard, prompt, **extra):
    return guard.on_prompt({"prompt": prompt, "client_id": "c", **extra})


def refusal_messages(guard, json_data) -> dict:
    """What ComfyUI's validate_prompt reports for the refused json: each node's
    VALIDATE_INPUTS result (execution.py validate_inputs, custom_validation_failed)."""
    cls = guard.NODE_CLASS_MAPPINGS[guard.REFUSAL_CLASS]
    out = {}
    for node_id, node in json_data["prompt"].items():
        assert node["class_type"] == guard.REFUSAL_CLASS and cls.OUTPUT_NODE
        out[node_id] = cls.VALIDATE_INPUTS(**node["inputs"])
    return out


def test_allowed_prompt_goes_through_unchanged(guard, engine):
    data = {"prompt": txt2img(), "client_id": "c"}
    before = copy.deepcopy(data)
    assert guard.on_prompt(data) is data and data == before
    checked = [text for text, _ in engine.calls]
    assert "beautiful scenery nature glass bottle landscape" in checked
    assert "text, watermark" not in checked  # the negative is context, never checked itself
    assert all(negative == "text, watermark" for _, negative in engine.calls)


def test_forbidden_words_only_in_the_negative_pass(guard, engine):
    data = {"prompt": txt2img("a quiet harbour", "forbiddenword, blurry")}
    assert guard.on_prompt(data) is data
    assert ("a quiet harbour", "forbiddenword, blurry") in engine.calls


def test_blocked_positive_refuses_with_the_node_named(guard, engine):
    data = {"prompt": txt2img("a forbiddenword portrait"), "client_id": "c",
            "partial_execution_targets": ["9"], "extra_data": {"extra_pnginfo": {}}}
    refused = guard.on_prompt(data)
    assert refused is not data and data["prompt"]["6"]["class_type"] == "CLIPTextEncode"
    assert "partial_execution_targets" not in refused and refused["client_id"] == "c"
    [(node_id, message)] = refusal_messages(guard, refused).items()
    assert node_id == "6"  # the front end outlines the refused encoder
    assert message == ("Consent Guard refuses the text of node 6 (CLIPTextEncode), input "
                       "'text': This prompt asks for sexual content, which is not allowed here. "
                       "Change the prompt and run it again.")
    assert "sexual_explicit" not in message and "forbiddenword" not in message


def test_refusal_response_is_shaped_for_the_front_end(guard, engine):
    """What validate_prompt answers (enforce.install_refusal_shape): the message once, the
    refused node under its real id and class, as the 1.27 front end reads node_errors."""
    refused = submit(guard, txt2img("a forbiddenword portrait"))
    ok, error, outputs, node_errors = guard.refusal_response(refused["prompt"])
    assert ok is False and outputs == []
    assert error["type"] == "consent_guard_refused"
    assert error["message"] == "Consent Guard refused this prompt"
    assert error["details"] == ("This prompt asks for sexual content, which is not allowed "
                                "here. Change the prompt and run it again.")
    assert list(node_errors) == ["6"]
    node = node_errors["6"]
    assert node["class_type"] == "CLIPTextEncode"  # the user's node, not the refusal class
    [err] = node["errors"]
    assert err["message"] == "Refused by Consent Guard" and err["details"] == "input 'text'"
    # what PromptExecutionError.toString shows: the sentence once, no codes
    shown = (error["message"] + ": " + error["details"] + "".join(
        "\n" + n["class_type"] + ":" + "".join("\n    - " + e["message"] + ": " + e["details"]
                                              for e in n["errors"])
        for n in node_errors.values()))
    assert shown.count("sexual content") == 1 and "sexual_explicit" not in shown
    payload = error["extra_info"]["consent_guard"]
    assert payload["kind"] == "prompt_explicit" and payload["nodes"] == ["6"]
    assert set(payload["texts"]) == {"en", "id", "ko"}
    # any other prompt is ComfyUI's to validate
    assert guard.refusal_response(txt2img()) is None and guard.refusal_response({}) is None


def test_the_admins_line_is_under_the_refusal(guard, engine, monkeypatch):
    monkeypatch.setattr(guard, "contact", lambda: "Talk to your teacher.")
    refused = submit(guard, txt2img("a forbiddenword portrait"))
    _, error, _, _ = guard.refusal_response(refused["prompt"])
    assert error["details"].endswith("Talk to your teacher.")
    assert error["extra_info"]["consent_guard"]["contact"] == "Talk to your teacher."


def test_a_failed_check_says_so_without_a_fake_node(guard, monkeypatch):
    def broken():
        raise guard.ConsentGuardError("Consent Guard cannot read its policy: bad toml")
    monkeypatch.setattr(guard, "get_engine", broken)
    _, error, _, node_errors = guard.refusal_response(submit(guard, txt2img())["prompt"])
    assert node_errors == {}  # "consent_guard" is no node of the user's graph
    assert error["message"] == "Consent Guard could not check this prompt"
    assert "bad toml" in error["details"]
    assert error["extra_info"]["consent_guard"]["kind"] == "check_failed"


def test_refusal_through_the_stand_in_server(comfy, monkeypatch, tmp_path):
    """Loaded while a server runs: the handler is added once and refuses through
    trigger_on_prompt, as server.py post_prompt calls it."""
    server = comfy_standins.make_server()
    for key in [k for k in sys.modules if k.startswith(PKG)]:
        del sys.modules[key]
    comfy_standins.install(monkeypatch, tmp_path / "comfy2", server=server)
    guard = sys.modules[PKG + ".nodes.prompt_guard"]
    monkeypatch.setattr(guard, "get_engine", PromptEngine)
    instance = server.PromptServer.instance
    assert instance.on_prompt_handlers == [guard.on_prompt]
    assert guard.register_prompt_handler() is False and len(instance.on_prompt_handlers) == 1
    paths = [r.path for r in instance.routes]
    assert {"/consent_guard/identities/status", "/consent_guard/identities/enroll",
            "/consent_guard/status", "/consent_guard/policy", "/consent_guard/audit"} <= set(paths)
    assert len(paths) == len({(r.method, r.path) for r in instance.routes})  # each added once
    refused = instance.trigger_on_prompt({"prompt": primitives("forbid", "denword", "")})
    assert list(refusal_messages(guard, refused)) == ["6"]  # only the concatenation is blocked
    ok = {"prompt": primitives()}
    assert instance.trigger_on_prompt(ok) is ok


def test_no_handler_without_a_server(guard):
    assert "server" not in sys.modules
    assert guard.register_prompt_handler() is False


def test_names_are_never_echoed(guard, monkeypatch):
    double = PromptEngine(category="protected_identity", label="Jane Example")
    monkeypatch.setattr(guard, "get_engine", lambda: double)
    refused = submit(guard, txt2img("Jane Example forbiddenword"))
    message = refusal_messages(guard, refused)["6"]
    assert "Jane" not in message
    # refused only for naming someone protected: the words are a sexual prompt's refusal
    assert "protected" not in message and "sexual content" in message


class TwoReasons(PromptEngine):
    """A sexual prompt that also names someone protected: refused either way."""

    def check_prompt(self, text, negative=None):
        if "forbiddenword" in text:
            return Verdict(Decision.BLOCK, (
                Reason("lexicon", "forbiddenword", 1.0, "sexual_explicit", Decision.BLOCK),
                Reason("prompt_identity", "id_0123abcd", 1.0, "protected_identity",
                       Decision.BLOCK)))
        return Verdict(Decision.ALLOW)


def test_an_explicit_prompt_never_tells_who_is_enrolled(guard, monkeypatch):
    """The same words with a name nobody enrolled are refused as explicit too: saying
    "protected" here would tell that this name is enrolled."""
    monkeypatch.setattr(guard, "get_engine", TwoReasons)
    refused = submit(guard, txt2img("Jane Example forbiddenword"))
    message = refusal_messages(guard, refused)["6"]
    assert "protected" not in message and "id_0123abcd" not in message
    assert "sexual content" in message
    _, error, _, _ = guard.refusal_response(refused["prompt"])
    assert error["extra_info"]["consent_guard"]["kind"] == "prompt_explicit"


def test_engine_that_cannot_load_refuses(guard, monkeypatch):
    def broken():
        raise guard.ConsentGuardError("Consent Guard cannot read its policy, so nothing is "
                                      "saved: bad toml")
    monkeypatch.setattr(guard, "get_engine", broken)
    messages = refusal_messages(guard, submit(guard, txt2img()))
    assert list(messages) == [guard.WHOLE_PROMPT] and "bad toml" in messages[guard.WHOLE_PROMPT]


def test_failing_check_refuses(guard, monkeypatch):
    class Broken:
        def check_prompt(self, text, negative=None):
            raise RuntimeError("encoder missing")
    monkeypatch.setattr(guard, "get_engine", Broken)
    messages = refusal_messages(guard, submit(guard, txt2img()))
    [(node_id, message)] = messages.items()  # the first failure stops: one message, not many
    assert node_id == "6"  # the positive prompt is checked first
    assert "could not check node 6 (CLIPTextEncode)" in message and "encoder missing" in message
    monkeypatch.setattr(guard, "get_engine", object)  # an engine without check_prompt at all
    assert len(refusal_messages(guard, submit(guard, txt2img()))) == 1


def test_handler_failure_refuses(guard, engine, monkeypatch):
    def crash(prompt):
        raise KeyError("boom")
    monkeypatch.setattr(guard, "collect_prompt_texts", crash)
    messages = refusal_messages(guard, submit(guard, txt2img()))
    assert "could not check this prompt" in messages[guard.WHOLE_PROMPT]


def test_not_a_prompt_is_left_to_comfyui(guard, engine):
    for data in ({"client_id": "c"}, {"prompt": "text"}):
        assert guard.on_prompt(data) is data
    assert engine.calls == []


def test_verdicts_are_remembered_per_text(guard, engine):
    submit(guard, txt2img())
    first = len(engine.calls)
    submit(guard, txt2img())
    assert len(engine.calls) == first


# -- ConsentGuardCheckPrompt -----------------------------------------------------------------

def test_check_prompt_node(comfy, guard, engine):
    cls = comfy.NODE_CLASS_MAPPINGS["ConsentGuardCheckPrompt"]
    assert comfy.NODE_DISPLAY_NAME_MAPPINGS["ConsentGuardCheckPrompt"] == \
        "Consent Guard: Check Prompt"
    spec = cls.INPUT_TYPES()
    assert spec["required"]["text"] == ("STRING", spec["required"]["text"][1])
    assert spec["required"]["text"][1]["forceInput"]
    assert spec["optional"]["negative"][1]["forceInput"]
    assert cls.RETURN_TYPES == ("STRING",) and cls.CATEGORY == "Consent Guard"
    assert isinstance(cls.IS_CHANGED(), str)
    node = cls()
    assert node.check("a quiet harbour", negative="forbiddenword") == ("a quiet harbour",)
    with pytest.raises(guard.ConsentGuardError) as err:
        node.check("forbiddenword at night")
    assert str(err.value) == ("Consent Guard refuses this prompt: This prompt asks for sexual "
                              "content, which is not allowed here. Change the prompt and run it "
                              "again.")
    assert isinstance(err.value, guard.ConsentGuardRefusal)  # stops the run without a report
    assert err.value.kind == "prompt_explicit"


def test_check_prompt_node_fails_closed(comfy, guard, monkeypatch):
    class Broken:
        def check_prompt(self, text, negative=None):
            raise RuntimeError("encoder missing")
    monkeypatch.setattr(guard, "get_engine", Broken)
    with pytest.raises(guard.ConsentGuardError, match="encoder missing"):
        comfy.NODE_CLASS_MAPPINGS["ConsentGuardCheckPrompt"]().check("a quiet harbour")


def test_check_prompt_node_is_a_negative_root(guard):
    """Its `negative` input marks what feeds it as negative; its text stays positive."""
    g = primitives()
    g["24"] = {"class_type": "PrimitiveString", "inputs": {"value": "ugly"}}
    g["25"] = {"class_type": "ConsentGuardCheckPrompt",
               "inputs": {"text": ["21", 0], "negative": ["24", 0]}}
    g["6"]["inputs"]["text"] = ["25", 0]
    texts = by_place(guard.collect_prompt_texts(g))
    assert texts[("24", "value")] == ("ugly", "negative")
    assert texts[("25", "text")] == ("a portrait, in the rain", "positive")
    assert texts[("20", "value")][1] == "positive"


def test_registering_the_handler_starts_loading_the_prompt_checks(guard, monkeypatch):
    """Issue 17: the encoder loads in the background while ComfyUI starts, so the first
    submission does not wait for it."""
    import consent_guard.prompts.classifier as classifier

    started = []
    monkeypatch.setattr(classifier, "start_loading", lambda: started.append(1))
    assert guard.preload_prompt_checks() is True and started == [1]
    server = type("Server", (), {"on_prompt_handlers": [],
                                 "add_on_prompt_handler": lambda self, h:
                                 self.on_prompt_handlers.append(h)})()
    monkeypatch.setattr(guard, "_server_instance", lambda: server)
    assert guard.register_prompt_handler() is True and started == [1, 1]
    assert guard.register_prompt_handler() is False and started == [1, 1]  # once
