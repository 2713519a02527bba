"""Prompt checks in ComfyUI: refuse a submission whose text asks for what the policy blocks,
before anything is queued, and a node for strings computed while the workflow runs.

How ComfyUI 0.3.64 handles a submission (server.py, PromptServer):
  * routes `post_prompt` (POST /prompt) calls `self.trigger_on_prompt(json_data)` first, and
    then works on what it returns: `json_data["prompt"]` goes to `execution.validate_prompt`;
    only a valid prompt is put on `self.prompt_queue`, an invalid one is answered 400 with
    {"error": ..., "node_errors": ...}.
  * `trigger_on_prompt` calls each handler added by `add_on_prompt_handler` and *swallows* its
    exceptions (logs a warning, goes on with the json unchanged). Raising refuses nothing.
  * Both run on the aiohttp event loop, synchronously: while on_prompt works, the whole server
    waits (GET /system_stats too). So one submission is bounded: each distinct text is checked
    once, at most MAX_TEXTS distinct texts and MAX_CHARS characters (more is refused with a
    clear message), and one audit record is written per submission, not one per text.
So `on_prompt` refuses by returning the json with the prompt replaced by one node per refused
node, of class ConsentGuardPromptRefusal, under the refused node's id. That class is an output
node whose VALIDATE_INPUTS returns the reason, so validate_prompt (execution.py,
validate_inputs: "custom_validation_failed") fails every output: nothing is queued and the 400
carries {"error": {"message": "Prompt outputs failed validation", "details": <ours>},
"node_errors": {<refused node id>: ...}}. The front end (comfyui-frontend-package 1.27,
app.ts queuePrompt -> PromptExecutionError.toString) shows error.message, error.details and
every node error in its error dialog, and outlines the node whose id is a key of node_errors
(litegraphService.ts, strokeStyles.nodeError) - the refused text encoder itself.

What the user is told (consent_guard/messages.py): one plain sentence and what to do next, in
their UI language, under the refused node, never a code, a label or a name. Which reason is
shown never tells more than the refusal itself: a prompt refused as sexual is never told it
also named someone enrolled (that would tell anyone who is enrolled: the same words with another
name would pass); "a protected person" is said only when nothing else refused the text, and
then the refusal alone already says as much. The audit log keeps the real reasons (categories,
identity ids, the places) for the admin.

How ComfyUI shows it: nodes/enforce.py wraps execution.validate_prompt (refusal_response): a
prompt made only of refusal nodes is answered at once with error = {"type":
"consent_guard_refused", "message": "Consent Guard refused this prompt", "details": <the
sentence, what to do, the admin's line>, "extra_info": {"consent_guard": <messages.payload>}}
and node_errors = {<the refused node's real id>: {"errors": [{"type", "message", "details":
"input 'text'", "extra_info"}], "dependent_outputs": [], "class_type": <its real class>}}: the
front end's PromptExecutionError.toString says each thing once, it outlines that node, and
web/js/refusals.js shows a toast in place of the error dialog. Without that wrapper the
refusal nodes' VALIDATE_INPUTS still refuse (the plain sentence, once per node).

Which strings are read (input_text): every widget value as ComfyUI's execution.py
validate_inputs hands it to the node: {"__value__": v} is unwrapped once, and a STRING input
gets str(v), so a dict or list value is read whole (its str() and every string inside it).
A list at the top is always a link to validate_inputs (a false one fails validation), so it
is never text; a link [node id, output] is followed instead: PrimitiveString(Multiline) and
StringConcatenate are resolved before the run, any other STRING output is marked `runtime`.
Not read: numbers and booleans; values picked from a node's fixed list of choices (model and
LoRA file names stay checked); the inputs of known classes that never reach a text encoder
(NOT_PROMPTS: our own nodes' policy_override, savers' filename_prefix, image loaders' file
names); and string nodes (primitives, concatenations) that feed only those. An input of an
unknown class is read whatever its name.

Roles (node_roles): a text that reaches nothing but the negative inputs of known samplers and
guiders whose guidance scale is a literal above 1 (CFG_SAMPLERS: KSampler, KSamplerAdvanced,
SamplerCustom, CFGGuider, DualCFGGuider, PerpNegGuider) is negative: uncond + cfg * (cond -
uncond) follows the negative alone at cfg 0 and partly below 1, so a cfg that is linked,
not a number, or <= 1 makes that negative a positive; so does any other link out of it.
Nodes that carry positive/negative conditioning through (ControlNetApplyAdvanced,
InpaintModelConditioning, ...: an output named like the input) are followed; any other node
with a "positive", "cond1", "cond2" or "negative" input counts as positive (strict). With a
CFG++ sampler (sampler name "*_cfg_pp") anywhere in the graph no text is negative. The Check
Prompt node's `negative` input is only context for its check, so what feeds it alone is
negative. Negative texts are never checked themselves (negative prompts are a
safety tool); they go with each check as its `negative` argument. Everything else, connected
or not, is checked like a positive.

For a run-time check (nodes/enforce.py): check_text(engine, text, negative) is the cached,
fail-closed check; REFUSED / refused_message(where) the message to show; input_text(value) the
text a widget value becomes; node_roles(prompt) the roles above.
"""
from __future__ import annotations

import logging
import math
import re
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..consent_guard import messages
from ..consent_guard.verdict import Decision, Reason, Verdict
from .comfy_bridge import (ConsentGuardError, ConsentGuardRefusal, checks_state, contact,
                           get_engine)
from .image_nodes import CATEGORY, _PolicyBound, record

log = logging.getLogger("consent_guard")

REFUSAL_CLASS = "ConsentGuardPromptRefusal"
REFUSAL_INPUT = "consent_guard"
REFUSAL_DETAILS = "details"  # JSON: kind, the refused node's class and inputs
REFUSED_TYPE = "consent_guard_refused"  # the error type API clients see
WHOLE_PROMPT = "consent_guard"  # the refusal's key when no single node is to blame
CHECK_PROMPT_CLASS = "ConsentGuardCheckPrompt"
WRAPPER = "__value__"  # execution.py validate_inputs unwraps {"__value__": v} once

# Bounds per submission (on_prompt holds ComfyUI's event loop; a check costs about 1-3 ms,
# bench/prompt_gate.py). Real workflows have a few dozen distinct texts.
MAX_TEXTS = 300  # distinct texts checked
MAX_CHARS = 200_000  # their characters, the negatives included
MAX_BUILT_CHARS = 1_000_000  # characters read from lists/dicts and built by concatenation
MAX_CHAIN = 200  # string nodes linked one into the next

POSITIVE_INPUTS = ("positive", "cond1", "cond2")  # cond1/cond2: DualCFGGuider
NEGATIVE_INPUTS = ("negative",)
ROLE_INPUTS = POSITIVE_INPUTS + NEGATIVE_INPUTS
# Samplers and guiders whose "negative" is pushed away from only while every named scale is
# a literal above its bound (comfy/samplers.py cfg_function: uncond + cfg * (cond - uncond);
# comfy_extras/nodes_custom_sampler.py Guider_DualCFG: the negative weighs 1 - cfg_cond2_negative;
# nodes_perpneg.py perp_neg: nocond + cfg * (pos - neg_scale * perp(neg))).
CFG_SAMPLERS = {"KSampler": {"cfg": 1.0}, "KSamplerAdvanced": {"cfg": 1.0},
                "SamplerCustom": {"cfg": 1.0}, "CFGGuider": {"cfg": 1.0},
                "DualCFGGuider": {"cfg_cond2_negative": 1.0},
                "PerpNegGuider": {"cfg": 1.0, "neg_scale": 0.0}}
CFG_PP = re.compile(r"cfg_?pp", re.IGNORECASE)  # CFG++ samplers step along the negative
# Stock nodes that carry positive/negative conditioning through (outputs named "positive",
# "negative"), for when ComfyUI's class list is not there to say so (the tests' stand-ins).
PASS_THROUGH = {"ControlNetApplyAdvanced", "ControlNetApplySD3", "InpaintModelConditioning",
                "ControlNetInpaintingAliMamaApply", "InstructPixToPixConditioning",
                "SVD_img2vid_Conditioning", "PairConditioningCombine",
                "PairConditioningSetProperties", "PairConditioningSetPropertiesAndCombine",
                "PairConditioningSetDefaultAndCombine", "WanImageToVideo"}
# Inputs that carry models, images and latents, never text: the walk from a sampler's
# conditioning stops there, so a loader is never "negative" (its file names stay checked).
PLUMBING = {"model", "clip", "vae", "clip_vision", "control_net", "style_model",
            "upscale_model", "image", "images", "pixels", "mask", "latent", "latent_image",
            "samples", "noise", "sampler", "sigmas", "guider"}
# Inputs of known classes whose text never reaches a text encoder: not prompt-checked. Only
# by class: an unknown class's "filename_prefix" may well feed an encoder.
_SAVERS = ("SaveImage", "SaveAnimatedWEBP", "SaveAnimatedPNG", "SaveSVGNode", "SaveLatent",
           "SaveAudio", "SaveAudioMP3", "SaveAudioOpus", "SaveVideo", "SaveWEBM", "SaveGLB",
           "CheckpointSave", "ImageOnlyCheckpointSave", "CLIPSave", "VAESave", "ModelSave",
           "LoraSave", "SaveLoRANode")
NOT_PROMPTS: Dict[str, frozenset] = {
    **{saver: frozenset({"filename_prefix"}) for saver in _SAVERS},
    "LoadImage": frozenset({"image"}), "LoadImageOutput": frozenset({"image"}),
    "LoadImageMask": frozenset({"image", "channel"}),
    # nodes/image_nodes.py: a TOML policy override, read by the node itself
    "ConsentGuardCheckImage": frozenset({"policy_override"}),
    "ConsentGuardPreviewImage": frozenset({"policy_override"}),
    "ConsentGuardSaveImage": frozenset({"policy_override", "filename_prefix"}),
}
# Fixed lists of choices of stock nodes, for when ComfyUI's class list is not there to give
# them (the tests' stand-ins); with it, every class's own lists are used instead.
STOCK_CHOICES = {"KSampler": {"sampler_name", "scheduler"},
                 "KSamplerAdvanced": {"sampler_name", "scheduler", "add_noise",
                                      "return_with_leftover_noise"},
                 "KSamplerSelect": {"sampler_name"}, "BasicScheduler": {"scheduler"},
                 "ImageScale": {"upscale_method", "crop"}, "ImageScaleBy": {"upscale_method"},
                 "LatentUpscale": {"upscale_method", "crop"},
                 "LatentUpscaleBy": {"upscale_method"}}
MODEL_FILE = re.compile(r"\.(safetensors|sft|ckpt|pt|pth|bin|gguf|onnx)$", re.IGNORECASE)
# Backend string nodes whose output is known without running them (comfy_extras/
# nodes_primitive.py PrimitiveString(Multiline): value; nodes_string.py StringConcatenate:
# delimiter.join((string_a, string_b))). Other STRING outputs are computed at run time:
# ConsentGuardCheckPrompt (and, in enforce mode, the text encoders' own check) covers those.
STRING_SOURCES = {"PrimitiveString", "PrimitiveStringMultiline", "StringConcatenate"}


class TooMuchText(Exception):
    """A submission over the bounds: refused whole, with this message."""


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


def _unwrap(value):
    """What validate_inputs hands on: {"__value__": v} -> v, once (not recursively)."""
    return value[WRAPPER] if isinstance(value, dict) and WRAPPER in value else value


class _Budget:
    """Characters read from lists and dicts and built by concatenation, per submission: a
    deeply nested value or a doubling chain of concatenations must not hold the server."""

    def __init__(self, limit: int = MAX_BUILT_CHARS):
        self.left = limit

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise TooMuchText(
                f"Consent Guard reads at most {MAX_BUILT_CHARS} characters of text built from "
                f"lists, dicts and joined strings in one submission, and this one has more, so "
                f"nothing was queued")


def _strings_inside(value, budget: _Budget) -> List[str]:
    """Every string inside a dict or list (keys too: str() shows them), in order; no recursion,
    so any depth is read."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        budget.spend(1)
        if isinstance(item, str):
            budget.spend(len(item))
            found.append(item)
        elif isinstance(item, dict):
            for key, sub in reversed(list(item.items())):
                stack.append(sub)
                if key != WRAPPER:
                    stack.append(key)
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return found


def input_text(value, budget: Optional[_Budget] = None) -> Optional[str]:
    """The text a node can get from a widget value (not a link), or None when it holds none.
    A string is itself (after a {"__value__": ...} wrapper). A dict or list is what a STRING
    input receives, its str(), followed by each string inside it as it is (a custom input may
    take the raw strings). Numbers and booleans hold no text."""
    value = _unwrap(value)
    if isinstance(value, str):
        return value
    if not isinstance(value, (dict, list, tuple)):
        return None
    budget = budget or _Budget()
    strings = _strings_inside(value, budget)
    if not strings:
        return None
    try:
        whole = str(value)
    except RecursionError:  # validate_inputs fails to convert it too; the strings remain
        whole = ""
    budget.spend(len(whole))
    return "\n".join([whole] + strings)


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


def _not_prompt(class_type: str, name: str) -> bool:
    return name in NOT_PROMPTS.get(class_type, ())


def _is_choice(classes, class_type: str, name: str, value, lists: Optional[dict] = None
               ) -> bool:
    """A value picked from the input's fixed list: not text. Model file names are (a LoRA's
    name can say what it makes), so they stay checked. `lists`: {(class, input): choices},
    filled as it goes, so each class's INPUT_TYPES() (file listings) runs once per submission."""
    value = _unwrap(value)
    if not isinstance(value, str) or MODEL_FILE.search(value):
        return False
    if classes is None:
        return name in STOCK_CHOICES.get(class_type, ())
    lists = {} if lists is None else lists
    if (class_type, name) not in lists:
        choices = _choices(classes, class_type, name)
        try:
            lists[(class_type, name)] = frozenset(choices)
        except TypeError:  # an odd list (unhashable items): looked through as it is
            lists[(class_type, name)] = tuple(choices)
    return value in lists[(class_type, name)]


# -- roles -----------------------------------------------------------------------------------

def _literal_above(value, bound: float) -> bool:
    """A widget value as validate_inputs turns it into a FLOAT, strictly above `bound`; a link,
    an odd value or NaN is not (it may be anything at run time)."""
    value = _unwrap(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return False
    return math.isfinite(number) and number > bound


def _uses_cfg_pp(prompt: dict) -> bool:
    """Any CFG++ sampler (k-diffusion *_cfg_pp steps along the negative's prediction)."""
    for node in prompt.values():
        if CFG_PP.search(_class_type(node)):
            return True
        name = _unwrap(_inputs(node).get("sampler_name"))
        if isinstance(name, str) and CFG_PP.search(name):
            return True
    return False


def _output_names(classes, node) -> Tuple[str, ...]:
    _, names = _return_info(classes, _class_type(node))
    return tuple(str(n).lower() for n in names)


def _carries_through(classes, node, name: str) -> bool:
    """Whether `name` (a role input) comes out again as an output of the same name, so the
    walk from what uses that output decides its role."""
    names = _output_names(classes, node)
    if names:
        return name in names
    return classes is None and _class_type(node) in PASS_THROUGH


def _root_role(prompt, node, name: str, cfg_pp: bool) -> str:
    """The role a role input gives what feeds it: "negative" only for the negative input of a
    known sampler or guider whose scales are literals above their bounds (or the Check Prompt
    node's context input), else "positive"."""
    class_type = _class_type(node)
    if name not in NEGATIVE_INPUTS:
        return "positive"
    if class_type == CHECK_PROMPT_CLASS:
        return "negative"  # only context for its check: it reaches no encoder through here
    bounds = CFG_SAMPLERS.get(class_type)
    inputs = _inputs(node)
    if bounds and not cfg_pp and all(_literal_above(inputs.get(scale), bound)
                                     for scale, bound in bounds.items()):
        return "negative"
    return "positive"


def _passes_through(prompt, classes, node_id: str, output: int) -> Optional[str]:
    """For a node with positive/negative inputs reached through one of its outputs: the input
    that output carries on (ControlNetApplyAdvanced: RETURN_NAMES ("positive", "negative"));
    None when the output is something else (then every other input is followed)."""
    node = prompt[node_id]
    inputs = _inputs(node)
    names = _output_names(classes, node)
    if output < len(names):
        name = names[output]
        return name if name in ROLE_INPUTS and name in inputs else None
    if not names and "positive" in inputs and "negative" in inputs and output in (0, 1):
        return ("positive", "negative")[output]  # the convention, when the class is unknown
    return None


Edge = Tuple[str, int, str, str]  # source id, output index, consumer id, input name


def _edges(prompt: dict) -> List[Edge]:
    """Every link of the prompt."""
    found = []
    for node_id, node in prompt.items():
        for name, value in _inputs(node).items():
            src = _link(prompt, value)
            if src is not None:
                found.append((src[0], src[1], str(node_id), name))
    return found


def _walk(prompt, classes, starts: List[Edge]) -> Tuple[set, set]:
    """(every node whose output reaches one of `starts`, every link that was followed),
    following conditioning back through combiners and pass-through nodes, never through
    model/image/latent inputs. One walk for all starts of a role: linear in the graph."""
    reached, followed, seen = set(), set(starts), set()
    stack = [(src, out) for src, out, _, _ in starts]
    while stack:
        node_id, output = stack.pop()
        if (node_id, output) in seen:
            continue
        seen.add((node_id, output))
        reached.add(node_id)
        only = _passes_through(prompt, classes, node_id, output)
        for name, value in _inputs(prompt[node_id]).items():
            if name in PLUMBING or (name != only if only else name in ROLE_INPUTS):
                continue  # other role inputs are walked from their own start
            src = _link(prompt, value)
            if src is not None:
                followed.add((src[0], src[1], node_id, name))
                stack.append(src)
    return reached, followed


def node_roles(prompt: dict, classes: Optional[dict] = None) -> Dict[str, str]:
    """{node id: "positive" | "negative"} for every node whose output reaches a role input
    (see the module's docstring). A node is negative only when every link out of it was
    followed by the walk back from the negative roots: one that also goes anywhere else (a
    positive, an unknown node's conditioning input) makes it, and what feeds it, positive.
    Nodes missing here reach no sampler: their texts are checked like positives. `classes`:
    ComfyUI's NODE_CLASS_MAPPINGS (default: the running ComfyUI's, when there is one)."""
    classes = _node_classes() if classes is None else classes
    cfg_pp = _uses_cfg_pp(prompt)
    edges = _edges(prompt)
    starts: Dict[str, List[Edge]] = {"positive": [], "negative": []}
    for edge in edges:
        node = prompt[edge[2]]
        if edge[3] in ROLE_INPUTS and not _carries_through(classes, node, edge[3]):
            starts[_root_role(prompt, node, edge[3], cfg_pp)].append(edge)
    negative, followed = _walk(prompt, classes, starts["negative"])
    escapes = [e for e in edges if e[0] in negative and e not in followed]
    positive, _ = _walk(prompt, classes, starts["positive"] + escapes)
    return {**{n: "negative" for n in negative - positive}, **{n: "positive" for n in positive}}


_roles = node_roles  # the earlier name


# -- strings through links -------------------------------------------------------------------

def _is_string_link(prompt, classes, link) -> bool:
    class_type = _class_type(prompt[link[0]])
    types, _ = _return_info(classes, class_type)
    return class_type in STRING_SOURCES or (link[1] < len(types) and types[link[1]] == "STRING")


class _Resolver:
    """The text a string link carries, as far as it is known before the run: each string node
    resolved once (memo), chains bounded in depth and in the characters they build."""

    def __init__(self, prompt: dict, budget: _Budget):
        self.prompt, self.budget = prompt, budget
        self.memo: Dict[str, Tuple[str, bool]] = {}

    def link(self, link, path=()) -> Tuple[str, bool]:
        """(what is known before the run, whether part of it is computed at run time)."""
        node_id = link[0]
        if node_id in path:
            return "", True  # a cycle: ComfyUI refuses it; nothing to read
        if len(path) >= MAX_CHAIN:
            raise TooMuchText(f"Consent Guard follows at most {MAX_CHAIN} string nodes linked "
                              f"one into the next, and this submission has more, so nothing "
                              f"was queued")
        if node_id not in self.memo:
            self.memo[node_id] = self._node(node_id, path + (node_id,))
        return self.memo[node_id]

    def _part(self, value, path) -> Tuple[str, bool]:
        src = _link(self.prompt, value)
        if src is not None:
            return self.link(src, path)
        if isinstance(value, list):
            return "", True  # a broken link: validate_inputs refuses it
        return input_text(value, self.budget) or "", False

    def _node(self, node_id: str, path) -> Tuple[str, bool]:
        node = self.prompt[node_id]
        inputs, class_type = _inputs(node), _class_type(node)
        if class_type in ("PrimitiveString", "PrimitiveStringMultiline"):
            return self._part(inputs.get("value", ""), path)
        if class_type == "StringConcatenate":
            (a, ra), (b, rb), (d, rd) = (self._part(inputs.get(k, ""), path) for k in
                                         ("string_a", "string_b", "delimiter"))
            joined = d.join((a, b))
            self.budget.spend(len(joined))
            return joined, ra or rb or rd
        return "", True


def _consumers(prompt: dict) -> Dict[str, List[Tuple[str, str]]]:
    """{source node id: [(consumer node id, input name)]} for every link."""
    users: Dict[str, List[Tuple[str, str]]] = {}
    for node_id, node in prompt.items():
        for name, value in _inputs(node).items():
            src = _link(prompt, value)
            if src is not None:
                users.setdefault(src[0], []).append((str(node_id), name))
    return users


def _feeds_only_non_prompts(prompt: dict) -> set:
    """String nodes (STRING_SOURCES) whose text goes nowhere but NOT_PROMPTS inputs, directly
    or through other such string nodes: e.g. a PrimitiveStringMultiline holding a node's
    policy_override. A string node that feeds nothing is not among them (checked, strict)."""
    users = _consumers(prompt)
    decided: Dict[str, bool] = {}

    def only_non_prompts(node_id: str, path=()) -> bool:
        if node_id in decided:
            return decided[node_id]
        ok = _class_type(prompt[node_id]) in STRING_SOURCES and bool(users.get(node_id)) \
            and len(path) < MAX_CHAIN and node_id not in path
        for user_id, name in users.get(node_id, ()) if ok else ():
            user_class = _class_type(prompt[user_id])
            if not (_not_prompt(user_class, name) or
                    only_non_prompts(user_id, path + (node_id,))):
                ok = False
                break
        decided[node_id] = ok
        return ok

    return {node_id for node_id in prompt if only_non_prompts(str(node_id))}


def collect_prompt_texts(prompt: dict) -> List[PromptText]:
    """Every string of the API-format prompt worth checking: each node's own text widgets
    (input_text: wrapped, dict and list values too), and for each string link into a node, the
    text it carries as far as it is known before the run (primitives and concatenations
    resolved; the rest marked `runtime`). Choices, NOT_PROMPTS inputs and string nodes feeding
    only those are left out. Raises TooMuchText past the bounds."""
    classes = _node_classes()
    roles = node_roles(prompt, classes)
    budget = _Budget()
    resolver = _Resolver(prompt, budget)
    skipped_nodes = _feeds_only_non_prompts(prompt)
    lists: dict = {}
    texts: List[PromptText] = []
    for node_id, node in prompt.items():
        node_id, class_type = str(node_id), _class_type(node)
        if node_id in skipped_nodes:
            continue
        role = roles.get(node_id, "unknown")
        for name, value in _inputs(node).items():
            if _not_prompt(class_type, name):
                continue
            link = _link(prompt, value)
            if link is None and isinstance(value, list):
                continue  # validate_inputs takes every list as a link and fails a false one
            if link is None:
                text = input_text(value, budget)
                if text and text.strip() and \
                        not _is_choice(classes, class_type, name, value, lists):
                    texts.append(PromptText(node_id, class_type, name, text, role))
                continue
            if class_type in STRING_SOURCES or not _is_string_link(prompt, classes, link):
                continue
            text, runtime = resolver.link(link)
            texts.append(PromptText(node_id, class_type, name, text, role, runtime))
    return texts


# -- checking --------------------------------------------------------------------------------

_cache: "OrderedDict[tuple, tuple]" = OrderedDict()  # key -> (engine, verdict)
_cache_lock = threading.Lock()
CACHE_SIZE = 1024


def check_text(engine, text: str, negative: Optional[str], state: Optional[tuple] = None
               ) -> Verdict:
    """engine.check_prompt, remembered per engine, policy and registry state (a re-queued
    workflow is not checked again); a check that raises blocks (fail closed). `state`:
    comfy_bridge.checks_state(), when the caller has it already (it reads files)."""
    key = (id(engine), checks_state() if state is None else state, text, negative)
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


REFUSED = "the policy does not allow it"  # the earlier wording, kept for other callers


def shown_kind(verdict: Verdict) -> str:
    """The refusal kind the user is told for a refused text (see the module's docstring)."""
    return messages.kind_for(verdict, "prompt")


def refused_message(where: str, kind: str = messages.PROMPT_EXPLICIT) -> str:
    """What the user is told about a text the policy refuses, in English (the browser shows
    its own language from the payload): where, the plain sentence and what to do next."""
    return f"Consent Guard refuses the text of {where}: " \
           f"{messages.message(kind, contact=contact()).text()}"


@dataclass(frozen=True)
class Refused:
    """One refused node of a submission: why in words, the kind (None for a message of its
    own, e.g. too much text), its real class and the inputs whose text was refused."""
    why: str
    kind: Optional[str] = None
    class_type: str = ""
    inputs: Tuple[str, ...] = ()


PLAIN = {"minor_sexual": "sexual content involving minors (never allowed)",
         "protected_identity": "a protected person named in a sexual prompt",
         "undress_request": "a request to undress someone",
         "sexual_explicit": "sexual_explicit", "sexual_suggestive": "sexual_suggestive"}


def reasons_in_words(verdict: Verdict) -> str:
    """For the admin (the audit note): what was found, by policy category, in plain words;
    never a label or the text. Not for the user (it tells who is enrolled)."""
    cats = sorted({r.category for r in verdict.reasons})
    return ", ".join(PLAIN.get(c, c) for c in cats) or verdict.decision.value


_categories = reasons_in_words  # the earlier name


def _where(t: PromptText) -> str:
    return f"node {t.node_id} ({t.class_type}), input '{t.input_name}'"


def _submission_verdict(verdicts: List[Verdict]) -> Verdict:
    """All the checks of one submission as one audit record: the strictest decision, every
    reason once (identity ids included: audit.build lists them), the first error."""
    reasons = tuple(dict.fromkeys(r for v in verdicts for r in v.reasons))
    rules = [v.rule for v in verdicts if not v.allowed and v.rule] or \
        [v.rule for v in verdicts[:1] if v.rule]
    scores = [float(v.scores.get("prompt_classifier", 0.0)) for v in verdicts]
    return Verdict(Decision.strictest(v.decision for v in verdicts), reasons,
                   rule="; ".join(dict.fromkeys(rules)),
                   error=next((v.error for v in verdicts if v.error), None),
                   scores={"prompt_classifier": max(scores, default=0.0)})


def _limit_verdict(why: str) -> Verdict:
    return Verdict(Decision.BLOCK, (Reason("prompt_gate", "over_limit", 1.0, "limit",
                                           Decision.BLOCK),), rule=f"prompt gate: {why}")


def _bounded(texts: List[str], negative: Optional[str]) -> None:
    """Refuse (TooMuchText) a submission over MAX_TEXTS distinct texts or MAX_CHARS."""
    chars = sum(map(len, texts)) + len(negative or "")
    if len(texts) > MAX_TEXTS or chars > MAX_CHARS:
        raise TooMuchText(
            f"Consent Guard checks at most {MAX_TEXTS} different texts and {MAX_CHARS} "
            f"characters in one submission; this one has {len(texts)} texts and {chars} "
            f"characters, so nothing was queued. Queue it in smaller parts")


def _note(texts: List[PromptText], checked: int, refused: List[Tuple[PromptText, Verdict]],
          late: List[PromptText]) -> str:
    """The audit record's note: counts, and for the admin each refused place with its real
    reasons (at most 20 places)."""
    parts = [f"prompt gate: {len(texts)} texts, {checked} distinct checked"]
    if refused:
        shown = [f"{_where(t)}: {reasons_in_words(v)}" for t, v in refused[:20]]
        more = f"; and {len(refused) - 20} more" if len(refused) > 20 else ""
        parts.append("refused " + "; ".join(shown) + more)
    if late:
        parts.append(f"{len(late)} computed at run time")
    return ". ".join(parts)


def _audit(engine, verdict: Verdict, note: str, client, prompt=None, negative=None
           ) -> Optional[str]:
    """The submission's one audit record; in enforce mode a record that cannot be written
    refuses the submission (returns why)."""
    try:
        record(engine, "prompt", verdict, note=note, prompt=prompt, negative=negative,
               client_id=client)
    except ConsentGuardError as exc:
        return f"{exc}. Nothing was queued."
    return None


def _refuse_whole(why: str, client) -> Dict[str, Refused]:
    """A submission refused before its texts were checked (over the bounds): logged, audited
    when the engine loads."""
    log.warning("Consent Guard: prompt refused: %s", why)
    try:
        engine = get_engine()
    except ConsentGuardError:
        return {WHOLE_PROMPT: Refused(f"{why}.")}
    failed = _audit(engine, _limit_verdict(why), why, client)
    return {WHOLE_PROMPT: Refused(failed, messages.CHECK_FAILED) if failed
            else Refused(f"{why}.")}


def refusals(prompt: dict, client: Optional[str] = None) -> Dict[str, str]:
    """{node id: why} for every node whose text the policy blocks; empty when all is allowed."""
    return {node_id: r.why for node_id, r in refused_nodes(prompt, client).items()}


def refused_nodes(prompt: dict, client: Optional[str] = None) -> Dict[str, Refused]:
    """{node id: Refused} for every node whose text the policy blocks; empty when all is
    allowed. Each distinct text is checked once; the submission gets one audit record
    (`client`: the submitting ComfyUI client id)."""
    try:
        texts = collect_prompt_texts(prompt)
    except TooMuchText as exc:
        return _refuse_whole(str(exc), client)
    to_check = sorted((t for t in texts if t.role != "negative" and t.text.strip()),
                      key=lambda t: t.role != "positive")  # the prompts first, then the rest
    late = [t for t in texts if t.runtime and t.role != "negative"]
    if late:
        log.info("Consent Guard: %d text(s) computed while the workflow runs (first: %s); "
                 "put a Consent Guard: Check Prompt node after them to check them",
                 len(late), _where(late[0]))
    if not to_check:
        return {}
    negative = "\n".join(dict.fromkeys(t.text for t in texts
                                       if t.role == "negative" and t.text.strip())) or None
    distinct = list(dict.fromkeys(t.text for t in to_check))
    try:
        _bounded(distinct, negative)
    except TooMuchText as exc:
        return _refuse_whole(str(exc), client)
    try:
        engine = get_engine()
    except ConsentGuardError as exc:
        return {WHOLE_PROMPT: Refused(f"Consent Guard cannot check prompts, so nothing was "
                                      f"queued: {exc}", messages.CHECK_FAILED)}
    return _check_all(engine, texts, to_check, distinct, negative, late, client)


def _check_all(engine, texts, to_check, distinct, negative, late, client
               ) -> Dict[str, Refused]:
    """Check each distinct text once (stopping at the first check that cannot run: the others
    would fail alike), write the one audit record, and say which nodes are refused."""
    state = checks_state()
    verdicts: Dict[str, Verdict] = {}
    for text in distinct:
        verdicts[text] = verdict = check_text(engine, text, negative, state)
        if verdict.error:
            break
    refused = [(t, verdicts[t.text]) for t in to_check
               if t.text in verdicts and not verdicts[t.text].allowed]
    shown = [t.text for t, _ in refused] or [t.text for t in to_check if t.role == "positive"]
    failed = _audit(engine, _submission_verdict(list(verdicts.values())),
                    _note(texts, len(verdicts), refused, late), client,
                    prompt="\n".join(dict.fromkeys(shown)) or None, negative=negative)
    if failed:
        return {WHOLE_PROMPT: Refused(failed, messages.CHECK_FAILED)}
    found: Dict[str, List[Tuple[PromptText, Verdict]]] = {}
    for t, verdict in refused:
        found.setdefault(t.node_id, []).append((t, verdict))
        if verdict.error:
            break
    if found:
        log.warning("Consent Guard: prompt refused at %d node(s); the reasons are in the audit "
                    "log", len(found))
    return {node_id: _refused(items) for node_id, items in found.items()}


def _refused(items: List[Tuple[PromptText, Verdict]]) -> Refused:
    """One node's refusal: a check that could not run says so (with the error, for whoever
    fixes it); a policy refusal is the one plain sentence of the node's strictest kind."""
    inputs = tuple(dict.fromkeys(t.input_name for t, _ in items))
    errors = [(t, v) for t, v in items if v.error]
    if errors:
        t, v = errors[0]
        return Refused(f"Consent Guard could not check {_where(t)}, so nothing was queued: "
                       f"{v.error}", messages.CHECK_FAILED, t.class_type, inputs)
    kind = strictest_kind(shown_kind(v) for _, v in items)
    return Refused(refused_message(_where(items[0][0]), kind), kind, items[0][0].class_type,
                   inputs)


_KIND_ORDER = (messages.PROMPT_MINOR, messages.PROMPT_EXPLICIT,
               messages.CHECK_FAILED)


def strictest_kind(kinds) -> str:
    """The kind to tell when several texts are refused: minors, explicit, then protected
    (the least revealing first, see the module's docstring)."""
    kinds = set(kinds)
    return next((k for k in _KIND_ORDER if k in kinds), messages.PROMPT_EXPLICIT)


def on_prompt(json_data: dict) -> dict:
    """The on-prompt handler (server.py trigger_on_prompt): returns json_data unchanged when
    every text is allowed, else a copy whose prompt makes validate_prompt fail with the
    reasons (see the module's docstring). Any failure refuses too: ComfyUI would swallow an
    exception and queue the prompt unchecked."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data  # post_prompt answers "no_prompt" itself
    try:
        found = refused_nodes(prompt, json_data.get("client_id"))
    except Exception as exc:
        log.exception("Consent Guard: could not check the submitted prompt")
        found = {WHOLE_PROMPT: Refused(f"Consent Guard could not check this prompt, so nothing "
                                       f"was queued: {type(exc).__name__}: {exc}",
                                       messages.CHECK_FAILED)}
    if not found:
        return json_data
    refused = dict(json_data)
    refused["prompt"] = {node_id: _refusal_node(r) for node_id, r in found.items()}
    refused.pop("partial_execution_targets", None)  # every refusal node must be validated
    return refused


def _refusal_node(r: Refused) -> dict:
    import json

    details = json.dumps({"kind": r.kind, "class_type": r.class_type, "inputs": list(r.inputs)})
    return {"class_type": REFUSAL_CLASS,
            "inputs": {REFUSAL_INPUT: r.why, REFUSAL_DETAILS: details}}


def refusal_response(prompt) -> Optional[tuple]:
    """What validate_prompt returns for a prompt on_prompt refused (only refusal nodes): (False,
    error, [], node_errors), shaped for the front end (see the module's docstring); None for
    any other prompt."""
    import json

    if not isinstance(prompt, dict) or not prompt or not all(
            isinstance(n, dict) and n.get("class_type") == REFUSAL_CLASS for n in prompt.values()):
        return None
    refused: Dict[str, Refused] = {}
    for node_id, node in prompt.items():
        inputs = _inputs(node)
        try:
            info = json.loads(inputs.get(REFUSAL_DETAILS) or "{}")
        except (TypeError, ValueError):
            info = {}
        info = info if isinstance(info, dict) else {}
        refused[str(node_id)] = Refused(str(inputs.get(REFUSAL_INPUT) or "Consent Guard "
                                                                          "refused this prompt."),
                                        info.get("kind") if info.get("kind") in messages.KINDS
                                        else None, str(info.get("class_type") or ""),
                                        tuple(str(i) for i in info.get("inputs") or ()))
    return (False, _error(refused), [], _node_errors(refused))


def _error(refused: Dict[str, Refused]) -> dict:
    """The submission's error: said once. A policy refusal: the plain sentence of the
    strictest kind; otherwise (a check that could not run, too much text) each reason."""
    policy = [r.kind for r in refused.values() if r.kind and r.kind != messages.CHECK_FAILED]
    if policy:
        kind = strictest_kind(policy)
        details = messages.message(kind, contact=contact()).text()
        title = "Consent Guard refused this prompt"
    else:
        kind = messages.CHECK_FAILED
        details = " ".join(dict.fromkeys(r.why for r in refused.values()))
        title = "Consent Guard could not check this prompt"
    payload = messages.payload(kind, contact(), nodes=sorted(k for k in refused
                                                            if k != WHOLE_PROMPT))
    if kind == messages.CHECK_FAILED:
        payload["detail"] = details
    return {"type": REFUSED_TYPE, "message": title, "details": details,
            "extra_info": {"consent_guard": payload}}


def _node_errors(refused: Dict[str, Refused]) -> dict:
    """{real node id: ...} as execution.validate_prompt makes them, one error per node, under
    the node's own class (WHOLE_PROMPT is no node: it is in the error only)."""
    out = {}
    for node_id, r in refused.items():
        if node_id == WHOLE_PROMPT:
            continue
        where = ", ".join(f"input '{i}'" for i in r.inputs) or "its text"
        failed = r.kind == messages.CHECK_FAILED
        out[node_id] = {"errors": [{
            "type": REFUSED_TYPE,
            "message": "Could not be checked" if failed else "Refused by Consent Guard",
            "details": r.why if failed else where,
            "extra_info": {"input_name": r.inputs[0]} if r.inputs else {}}],
            "dependent_outputs": [], "class_type": r.class_type or REFUSAL_CLASS}
    return out


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
    preload_prompt_checks()
    return True


def preload_prompt_checks() -> bool:
    """Load the word lists and the sentence encoder in a background thread while ComfyUI
    starts (about a second of CPU), so the first submission is checked at once instead of
    waiting for them (issue 17: first check after start <= 0.5 s). A failure here is only
    logged: the first check loads again and fails closed with the full message."""
    try:
        from consent_guard.prompts.classifier import start_loading

        start_loading()
        return True
    except Exception:  # pragma: no cover - an import error is reported by the first check
        log.exception("Consent Guard: could not start loading the prompt checks")
        return False


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
        record(engine, "prompt", verdict, note=f"Check Prompt node: {reasons_in_words(verdict)}",
               prompt=text, negative=negative or None)
        if verdict.error:
            raise ConsentGuardError("Consent Guard could not check this prompt, so the "
                                    f"workflow stops here: {verdict.error}")
        if not verdict.allowed:  # the details are in the audit log only
            raise ConsentGuardRefusal(shown_kind(verdict), "Check Prompt",
                                      "Consent Guard refuses this prompt")
        return (text,)


class ConsentGuardPromptRefusal(_PolicyBound):
    """Not for graphs: on_prompt puts it in place of a refused submission. Its validation
    always fails with the reason, so ComfyUI queues nothing and shows the reason (it never
    runs; IS_CHANGED only keeps it like every other Consent Guard node)."""

    DEPRECATED = True  # hidden from the node library (front end: Comfy.Node.ShowDeprecated)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {REFUSAL_INPUT: ("STRING", {"multiline": True})},
                "optional": {REFUSAL_DETAILS: ("STRING", {"multiline": True})}}

    RETURN_TYPES = ()
    FUNCTION = "refuse"
    OUTPUT_NODE = True  # validate_prompt only validates what leads to an output node
    CATEGORY = CATEGORY
    DESCRIPTION = "Internal: stands in for a prompt Consent Guard refused."

    @classmethod
    def VALIDATE_INPUTS(cls, consent_guard, details=None):
        return consent_guard or "Consent Guard refused this prompt."

    def refuse(self, consent_guard, details=None):
        raise ConsentGuardError(consent_guard or "Consent Guard refused this prompt.")


NODE_CLASS_MAPPINGS = {
    CHECK_PROMPT_CLASS: ConsentGuardCheckPrompt,
    REFUSAL_CLASS: ConsentGuardPromptRefusal,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    CHECK_PROMPT_CLASS: "Consent Guard: Check Prompt",
    REFUSAL_CLASS: "Consent Guard: Prompt Refused (internal)",
}
