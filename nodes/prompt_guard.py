"""Prompt checks in ComfyUI: refuse a submission whose text asks for what the policy blocks,
before anything is queued, and a node for strings computed while the workflow runs.

How ComfyUI 0.3.64 handles a submission (server.py, PromptServer):
  * routes `post_prompt` (POST /prompt) calls `self.trigger_on_prompt(json_data)` first, and
    then works on what it returns: `json_data["prompt"]` goes to `execution.validate_prompt`;
    only a valid prompt is put on `self.prompt_queue`, an invalid one is answered 400 with
    {"error": ..., "node_errors": ...}.
  * `trigger_on_prompt` calls each handler added by `add_on_prompt_handler` and *swallows* its
    exceptions (logs a warning, goes on with the json unchanged). Raising refuses nothing.
So `on_prompt` refuses by returning the json with the prompt replaced by one node per refused
node, of class ConsentGuardPromptRefusal, under the refused node's id. That class is an output
node whose VALIDATE_INPUTS returns the reason, so validate_prompt (execution.py,
validate_inputs: "custom_validation_failed") fails every output: nothing is queued and the 400
carries {"error": {"message": "Prompt outputs failed validation", "details": <ours>},
"node_errors": {<refused node id>: ...}}. The front end (comfyui-frontend-package 1.27,
app.ts queuePrompt -> PromptExecutionError.toString) shows error.message, error.details and
every node error in its error dialog, and outlines the node whose id is a key of node_errors
(litegraphService.ts, strokeStyles.nodeError) - the refused text encoder itself.

Roles: a text reached by following links backwards from an input named "negative" (KSampler,
KSamplerAdvanced, SamplerCustom, CFGGuider, DualCFGGuider, ControlNetApplyAdvanced, ...) is
negative, one reached from "positive" / "cond1" / "cond2" is positive, one reached from both
is positive (strictest), the rest is "unknown" and checked like a positive. Negative texts are
never checked themselves (negative prompts are a safety tool); they go with each check as its
`negative` argument.
"""
from __future__ import annotations

import logging
import re
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..consent_guard.verdict import Verdict
from .comfy_bridge import ConsentGuardError, checks_state, get_engine
from .image_nodes import CATEGORY, _PolicyBound, record

log = logging.getLogger("consent_guard")

REFUSAL_CLASS = "ConsentGuardPromptRefusal"
REFUSAL_INPUT = "consent_guard"
WHOLE_PROMPT = "consent_guard"  # the refusal's key when no single node is to blame

POSITIVE_INPUTS = ("positive", "cond1", "cond2")  # cond1/cond2: DualCFGGuider
NEGATIVE_INPUTS = ("negative",)
ROLE_INPUTS = POSITIVE_INPUTS + NEGATIVE_INPUTS
# Inputs that carry models, images and latents, never text: the walk from a sampler's
# conditioning stops there, so a loader is never "negative" (its file names stay checked).
PLUMBING = {"model", "clip", "vae", "clip_vision", "control_net", "style_model",
            "upscale_model", "image", "images", "pixels", "mask", "latent", "latent_image",
            "samples", "noise", "sampler", "sigmas", "guider"}
# Widgets whose values are choices, not text (nodes.py KSampler, ImageScale, ...).
ENUM_INPUTS = {"sampler_name", "scheduler", "control_after_generate", "upscale_method", "crop"}
MODEL_FILE = re.compile(r"\.(safetensors|sft|ckpt|pt|pth|bin|gguf|onnx)$", re.IGNORECASE)
# Backend string nodes whose output is known without running them (comfy_extras/
# nodes_primitive.py PrimitiveString(Multiline): value; nodes_string.py StringConcatenate:
# delimiter.join((string_a, string_b))). Other STRING outputs are computed at run time:
# ConsentGuardCheckPrompt covers those.
STRING_SOURCES = {"PrimitiveString", "PrimitiveStringMultiline", "StringConcatenate"}


@dataclass(frozen=True)
class PromptText:
    node_id: str
    class_type: str
    input_name: str
    text: str  # what is known before the run
    role: str  # "positive" | "negative" | "unknown"
    runtime: bool = False  # part of it is computed while the workflow runs


# -- reading the API-format prompt -----------------------------------------------------------

def _inputs(node) -> dict:
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _class_type(node) -> str:
    return str(node.get("class_type", "")) if isinstance(node, dict) else ""


def _link(prompt: dict, value) -> Optional[Tuple[str, int]]:
    """[source node id, output index] -> (id, index) when the source exists."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) \
            and str(value[0]) in prompt:
        return str(value[0]), value[1]
    return None


def _node_classes() -> Optional[dict]:
    """ComfyUI's nodes.NODE_CLASS_MAPPINGS when ComfyUI runs (imported before any custom node),
    for output names and types and combo choices; None under the tests' stand-ins."""
    mod = sys.modules.get("nodes")
    if mod is None or mod is sys.modules.get(__package__):
        return None
    classes = getattr(mod, "NODE_CLASS_MAPPINGS", None)
    return classes if isinstance(classes, dict) else None


def _return_info(classes: Optional[dict], class_type: str) -> Tuple[tuple, tuple]:
    cls = classes.get(class_type) if classes else None
    if cls is None:
        return (), ()
    try:
        types = tuple(cls.RETURN_TYPES)
        return types, tuple(getattr(cls, "RETURN_NAMES", None) or types)
    except Exception:
        return (), ()


def _choices(classes: Optional[dict], class_type: str, name: str) -> List:
    cls = classes.get(class_type) if classes else None
    if cls is None:
        return []
    try:
        spec = cls.INPUT_TYPES()
        info = spec.get("required", {}).get(name) or spec.get("optional", {}).get(name)
        if info and isinstance(info[0], list):
            return info[0]
        if info and info[0] == "COMBO" and len(info) > 1:
            return list(info[1].get("options", []))
    except Exception:
        pass
    return []


def _worth_checking(classes, class_type: str, name: str, value: str) -> bool:
    if not value.strip() or name in ENUM_INPUTS:
        return False
    # a choice from a fixed list is not text, but model file names are (e.g. a LoRA's name)
    return bool(MODEL_FILE.search(value)) or value not in _choices(classes, class_type, name)


# -- roles -----------------------------------------------------------------------------------

def _passes_through(prompt, classes, node_id: str, output: int) -> Optional[str]:
    """For a node with positive/negative inputs reached through one of its outputs: the input
    that output carries on (ControlNetApplyAdvanced: RETURN_NAMES ("positive", "negative"));
    None when the output is something else (then every other input is followed)."""
    node = prompt[node_id]
    inputs = _inputs(node)
    _, names = _return_info(classes, _class_type(node))
    if output < len(names):
        name = str(names[output]).lower()
        return name if name in ROLE_INPUTS and name in inputs else None
    if not names and "positive" in inputs and "negative" in inputs and output in (0, 1):
        return ("positive", "negative")[output]  # the convention, when the class is unknown
    return None


def _roles(prompt: dict, classes) -> Dict[str, str]:
    reached: Dict[str, set] = {}
    for node in prompt.values():
        for name, value in _inputs(node).items():
            link = _link(prompt, value) if name in ROLE_INPUTS else None
            if link is None:
                continue
            role = "negative" if name in NEGATIVE_INPUTS else "positive"
            stack, seen = [link], set()
            while stack:
                node_id, output = stack.pop()
                if (node_id, output) in seen:
                    continue
                seen.add((node_id, output))
                reached.setdefault(node_id, set()).add(role)
                only = _passes_through(prompt, classes, node_id, output)
                for src_name, src_value in _inputs(prompt[node_id]).items():
                    if src_name in PLUMBING or (src_name != only if only else
                                                src_name in ROLE_INPUTS):
                        continue  # other role inputs are walked from their own start
                    src = _link(prompt, src_value)
                    if src is not None:
                        stack.append(src)
    return {node_id: "positive" if "positive" in roles else "negative"
            for node_id, roles in reached.items()}


# -- strings through links -------------------------------------------------------------------

def _is_string_link(prompt, classes, link) -> bool:
    class_type = _class_type(prompt[link[0]])
    types, _ = _return_info(classes, class_type)
    return class_type in STRING_SOURCES or (link[1] < len(types) and types[link[1]] == "STRING")


def _resolve(prompt, classes, link, seen=frozenset()) -> Tuple[str, bool]:
    """(what is known before the run, whether part of it is computed at run time)."""
    node_id = link[0]
    if node_id in seen:
        return "", True
    node = prompt[node_id]
    inputs, class_type = _inputs(node), _class_type(node)

    def part(value) -> Tuple[str, bool]:
        if isinstance(value, str):
            return value, False
        src = _link(prompt, value)
        return _resolve(prompt, classes, src, seen | {node_id}) if src else ("", True)

    if class_type in ("PrimitiveString", "PrimitiveStringMultiline"):
        return part(inputs.get("value", ""))
    if class_type == "StringConcatenate":
        (a, ra), (b, rb), (d, rd) = (part(inputs.get(k, "")) for k in
                                     ("string_a", "string_b", "delimiter"))
        return d.join((a, b)), ra or rb or rd
    return "", True


def collect_prompt_texts(prompt: dict) -> List[PromptText]:
    """Every string of the API-format prompt worth checking: each node's own text widgets, and
    for each string link into a node, the text it carries as far as it is known before the
    run (primitives and concatenations resolved; the rest marked `runtime`)."""
    classes = _node_classes()
    roles = _roles(prompt, classes)
    texts: List[PromptText] = []
    for node_id, node in prompt.items():
        node_id, class_type = str(node_id), _class_type(node)
        role = roles.get(node_id, "unknown")
        for name, value in _inputs(node).items():
            if isinstance(value, str):
                if _worth_checking(classes, class_type, name, value):
                    texts.append(PromptText(node_id, class_type, name, value, role))
                continue
            link = _link(prompt, value)
            if link is None or class_type in STRING_SOURCES \
                    or not _is_string_link(prompt, classes, link):
                continue
            text, runtime = _resolve(prompt, classes, link)
            texts.append(PromptText(node_id, class_type, name, text, role, runtime))
    return texts


# -- checking --------------------------------------------------------------------------------

_cache: "OrderedDict[tuple, tuple]" = OrderedDict()  # key -> (engine, verdict)
_cache_lock = threading.Lock()
CACHE_SIZE = 512


def check_text(engine, text: str, negative: Optional[str]) -> Verdict:
    """engine.check_prompt, remembered per engine, policy and registry state (a re-queued
    workflow is not checked again); a check that raises blocks (fail closed)."""
    key = (id(engine), checks_state(), text, negative)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] is engine:  # the engine is kept, so its id is not reused
            _cache.move_to_end(key)
            return hit[1]
    try:
        verdict = engine.check_prompt(text, negative=negative)
    except Exception as exc:
        log.exception("Consent Guard: prompt check failed")
        return Verdict.failed(f"{type(exc).__name__}: {exc}")
    if not verdict.error:
        with _cache_lock:
            _cache[key] = (engine, verdict)
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return verdict


PLAIN = {"minor_sexual": "sexual content involving minors (never allowed)",
         "protected_identity": "a protected person named in a sexual prompt",
         "undress_request": "a request to undress someone",
         "sexual_explicit": "sexual_explicit", "sexual_suggestive": "sexual_suggestive"}


def _categories(verdict: Verdict) -> str:
    """What was found, by policy category only, in plain words for the sensitive ones: never
    a label or the text (a protected person's name must not be echoed)."""
    cats = sorted({r.category for r in verdict.reasons})
    return ", ".join(PLAIN.get(c, c) for c in cats) or verdict.decision.value


def _where(t: PromptText) -> str:
    return f"node {t.node_id} ({t.class_type}), input '{t.input_name}'"


def refusals(prompt: dict, client: Optional[str] = None) -> Dict[str, str]:
    """{node id: why} for every node whose text the policy blocks; empty when all is allowed.
    Each decision goes to the audit log (`client`: the submitting ComfyUI client id)."""
    texts = collect_prompt_texts(prompt)
    to_check = sorted((t for t in texts if t.role != "negative" and t.text.strip()),
                      key=lambda t: t.role != "positive")  # the prompts first, then the rest
    late = [t for t in texts if t.runtime and t.role != "negative"]
    if late:
        log.info("Consent Guard: %s computed while the workflow runs; put a Consent Guard: "
                 "Check Prompt node after %s to check it", "; ".join(map(_where, late)),
                 "them" if len(late) > 1 else "it")
    if not to_check:
        return {}
    try:
        engine = get_engine()
    except ConsentGuardError as exc:
        return {WHOLE_PROMPT: f"Consent Guard cannot check prompts, so nothing was queued: {exc}"}
    negative = "\n".join(dict.fromkeys(t.text for t in texts
                                       if t.role == "negative" and t.text.strip())) or None
    found: Dict[str, List[str]] = {}
    for t in to_check:
        verdict = check_text(engine, t.text, negative)
        try:
            record(engine, "prompt", verdict, note=_where(t), prompt=t.text, negative=negative,
                   client_id=client)
        except ConsentGuardError as exc:  # enforce mode: nothing runs unlogged
            return {WHOLE_PROMPT: f"{exc}. Nothing was queued."}
        if verdict.error:  # the checker itself failed: the other texts would fail alike
            why = f"Consent Guard could not check {_where(t)}: {verdict.error}"
        elif not verdict.allowed:
            why = f"Consent Guard refuses the text of {_where(t)}: {_categories(verdict)}"
        else:
            continue
        log.warning("Consent Guard: prompt refused, %s", why)
        found.setdefault(t.node_id, []).append(why)
        if verdict.error:
            break
    return {node_id: ". ".join(w.rstrip(". ") for w in whys) + ". Nothing was queued."
            for node_id, whys in found.items()}


def on_prompt(json_data: dict) -> dict:
    """The on-prompt handler (server.py trigger_on_prompt): returns json_data unchanged when
    every text is allowed, else a copy whose prompt makes validate_prompt fail with the
    reasons (see the module's docstring). Any failure refuses too: ComfyUI would swallow an
    exception and queue the prompt unchecked."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data  # post_prompt answers "no_prompt" itself
    try:
        found = refusals(prompt, json_data.get("client_id"))
    except Exception as exc:
        log.exception("Consent Guard: could not check the submitted prompt")
        found = {WHOLE_PROMPT: f"Consent Guard could not check this prompt, so nothing was "
                               f"queued: {type(exc).__name__}: {exc}"}
    if not found:
        return json_data
    refused = dict(json_data)
    refused["prompt"] = {node_id: {"class_type": REFUSAL_CLASS, "inputs": {REFUSAL_INPUT: why}}
                         for node_id, why in found.items()}
    refused.pop("partial_execution_targets", None)  # every refusal node must be validated
    return refused


on_prompt.consent_guard_handler = True  # how register_prompt_handler recognises it


def _server_instance():
    try:
        import server as comfy_server  # ComfyUI's server.py, on sys.path when ComfyUI runs
    except ImportError:
        return None
    return getattr(getattr(comfy_server, "PromptServer", None), "instance", None)


def server_running() -> bool:
    return _server_instance() is not None


def handler_registered() -> bool:
    """Whether on_prompt is among the running server's handlers (enforce mode needs it)."""
    instance = _server_instance()
    return any(getattr(h, "consent_guard_handler", False)
               for h in getattr(instance, "on_prompt_handlers", ()) or ())


def register_prompt_handler() -> bool:
    """Add on_prompt to the running ComfyUI server, once (False without a server, or when it
    is there already, e.g. this package imported twice)."""
    instance = _server_instance()
    if instance is None or not hasattr(instance, "add_on_prompt_handler"):
        return False
    if any(getattr(h, "consent_guard_handler", False)
           for h in getattr(instance, "on_prompt_handlers", ())):
        return False
    instance.add_on_prompt_handler(on_prompt)
    return True


# -- nodes -----------------------------------------------------------------------------------

class ConsentGuardCheckPrompt(_PolicyBound):
    """STRING -> STRING for text computed while the workflow runs (an LLM prompt generator, a
    wildcard node): passes it on when allowed, stops the workflow with the reason otherwise."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True, "tooltip":
                                                 "The prompt to check, from another node."})},
                "optional": {"negative": ("STRING", {"forceInput": True, "tooltip":
                                                     "The negative prompt that goes with it."})}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    FUNCTION = "check"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Checks a prompt made while the workflow runs and passes it on when the "
                   "policy allows it; otherwise the workflow stops with the reason.")

    def check(self, text, negative=None):
        engine = get_engine()
        verdict = check_text(engine, text, negative or None)
        record(engine, "prompt", verdict, note="Check Prompt node", prompt=text,
               negative=negative or None)
        if verdict.error:
            raise ConsentGuardError("Consent Guard could not check this prompt, so the "
                                    f"workflow stops here: {verdict.error}")
        if not verdict.allowed:
            log.warning("Consent Guard: prompt refused at run time (%s)", _categories(verdict))
            raise ConsentGuardError(f"Consent Guard refuses this prompt: {_categories(verdict)}.")
        return (text,)


class ConsentGuardPromptRefusal(_PolicyBound):
    """Not for graphs: on_prompt puts it in place of a refused submission. Its validation
    always fails with the reason, so ComfyUI queues nothing and shows the reason (it never
    runs; IS_CHANGED only keeps it like every other Consent Guard node)."""

    DEPRECATED = True  # hidden from the node library (front end: Comfy.Node.ShowDeprecated)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {REFUSAL_INPUT: ("STRING", {"multiline": True})}}

    RETURN_TYPES = ()
    FUNCTION = "refuse"
    OUTPUT_NODE = True  # validate_prompt only validates what leads to an output node
    CATEGORY = CATEGORY
    DESCRIPTION = "Internal: stands in for a prompt Consent Guard refused."

    @classmethod
    def VALIDATE_INPUTS(cls, consent_guard):
        return consent_guard or "Consent Guard refused this prompt."

    def refuse(self, consent_guard):
        raise ConsentGuardError(consent_guard or "Consent Guard refused this prompt.")


NODE_CLASS_MAPPINGS = {
    "ConsentGuardCheckPrompt": ConsentGuardCheckPrompt,
    REFUSAL_CLASS: ConsentGuardPromptRefusal,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConsentGuardCheckPrompt": "Consent Guard: Check Prompt",
    REFUSAL_CLASS: "Consent Guard: Prompt Refused (internal)",
}
