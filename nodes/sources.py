"""Enforce mode judges content where it enters the graph or is made, not only where it leaves.

Checking only what output nodes receive cannot hold: a rotated, inverted, padded or tiled copy
of a protected person's photo no longer looks like them to a detector, and is turned back
after it is saved. So, in enforce mode, for every node that runs (nodes/enforce.py wraps
execution.get_output_data and execution.get_output_from_returns, ComfyUI a125cd84):

1. Before it runs, every IMAGE and MASK it is handed must have been checked: one whose content
   is not in the verdict cache (ComfyUI reused a node's output from an earlier run, a custom
   node made it in a way we did not see) is checked now. A refused one stops the workflow.
2. After it runs, every IMAGE and MASK it made is checked, unless the node is a known pure
   transform (nodes/pure_transforms.py). A refused one stops the workflow there, with the
   reason; a censored one is replaced by its censored copy.

A pure transform's output is not taken as allowed, only as *derived* from checked pictures:
another pure transform may use it unchecked (a chain of rotate, scale and crop costs no check
in between), but any other node, every saver and /view check it. Scaling and cropping can
reveal what the check of the input could not see (red team, on the real ComfyUI: a face
3 px tall in the detector's copy of a 16384 px strip, cropped out by Image Scale's centre
crop; a second picture hidden in every fourth pixel of a cat photo, picked out by
nearest-neighbour downscaling; a 128 px copy upscaled until it could be matched).

A MASK is checked as a grayscale image. Verdicts are cached by a digest of the tensor's bytes
(SHA-256), for as long as the policy and the identity registry are unchanged, so a picture is
never checked twice: the VAE decoder's output is the saver's input, and the saver's own check
(enforce.gate_images) finds it in the cache.

Text: every string a CLIP tokenizer receives (comfy/sd.py CLIP.tokenize, which every stock
text encoder calls, LoadImageTextSetFromFolderNode's captions included) is checked at that
moment, unless the node that encodes it feeds only negative inputs of samplers that follow
the positive prompt (prompt_guard's roles, with cfg > 1).
"""
from __future__ import annotations

import contextvars
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from ..consent_guard import messages
from . import comfy_bridge, image_nodes
from .comfy_bridge import ConsentGuardError, ConsentGuardRefusal, frames_to_tensor
from .pure_transforms import is_api_node, pure_classes

log = logging.getLogger("consent_guard")

VISUAL_TYPES = ("IMAGE", "MASK")
MIN_SIDE = 16  # an untyped tensor smaller than this is not taken for a picture
MAX_DEPTH = 4  # how deep lists, tuples and dicts are searched for tensors
CACHE_SIZE = 4096


@dataclass
class NodeRun:
    """The node that is running (set by the get_output_data wrapper)."""
    prompt_id: Any
    unique_id: Any
    cls: type
    pure: bool
    inputs_have_tensors: bool = False
    # digests of the inputs, by id, while the node has not run yet (a node may change its
    # inputs in place: forgotten before its outputs are looked at)
    digests: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"node {self.unique_id} ({getattr(self.cls, '__name__', self.cls)})"


current: contextvars.ContextVar = contextvars.ContextVar("consent_guard_node", default=None)


# -- the verdict cache -------------------------------------------------------------------------

class VerdictCache:
    """Digests of pictures found allowed under the current policy and registry."""

    def __init__(self, size: int = CACHE_SIZE):
        self._ok: "OrderedDict[str, bool]" = OrderedDict()
        self._state = None
        self._size = size
        self._lock = threading.Lock()

    def _current(self, state) -> None:
        if state != self._state:
            self._ok.clear()
            self._state = state

    def allowed(self, digest: str, state) -> bool:
        with self._lock:
            self._current(state)
            if digest in self._ok:
                self._ok.move_to_end(digest)
                return True
            return False

    def add(self, digest: str, state) -> None:
        with self._lock:
            self._current(state)
            self._ok[digest] = True
            while len(self._ok) > self._size:
                self._ok.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._ok.clear()


CACHE = VerdictCache()    # pictures found allowed
DERIVED = VerdictCache()  # pure transforms of allowed or derived pictures (not allowed)


def state():
    """What a verdict depends on besides the pixels: the policy file and the registry."""
    return comfy_bridge.checks_state()


def digest(tensor) -> str:
    """SHA-256 of the tensor's shape, dtype and bytes (on the CPU, contiguous): about 6 ms for
    a 1024 x 768 IMAGE here, less than half of BLAKE2b's (CPUs hash SHA-256 in hardware)."""
    run = current.get()
    memo = run.digests if run is not None else None
    if memo is not None:
        hit = memo.get(id(tensor))
        if hit is not None and hit[0] is tensor:
            return hit[1]
    t = tensor.detach()
    if getattr(t, "device", None) is not None and str(t.device) != "cpu":
        t = t.cpu()
    arr = t.contiguous().numpy()
    h = hashlib.sha256(f"{tuple(arr.shape)}|{arr.dtype}|".encode())
    h.update(memoryview(arr).cast("B"))
    out = h.hexdigest()
    if memo is not None:
        memo[id(tensor)] = (tensor, out)
    return out


# -- finding pictures ---------------------------------------------------------------------------

def _is_tensor(value) -> bool:
    return hasattr(value, "detach") and hasattr(value, "shape")


def looks_like_image(value) -> bool:
    shape = getattr(value, "shape", None)
    return _is_tensor(value) and shape is not None and len(shape) == 4 and shape[0] > 0 \
        and shape[-1] in (1, 3, 4) and shape[1] >= MIN_SIDE and shape[2] >= MIN_SIDE


def looks_like_mask(value) -> bool:
    shape = getattr(value, "shape", None)
    return _is_tensor(value) and shape is not None and len(shape) in (2, 3) \
        and all(s > 0 for s in shape)


def pictures(value, kind: Optional[str], depth: int = 0) -> List[Tuple[str, Any]]:
    """(kind, tensor) for every picture in a value: a tensor of a declared IMAGE or MASK
    type, and any image-shaped tensor ([B, H, W, 1|3|4]) inside lists, tuples or dicts (a
    custom type may carry one). Latents ([B, 4, h, w] inside {"samples": ...}) and
    conditioning are not pictures."""
    if _is_tensor(value):
        if kind == "MASK" and looks_like_mask(value):
            return [("MASK", value)]
        if looks_like_image(value) or (kind == "IMAGE" and len(value.shape) == 4):
            return [("IMAGE", value)]
        return []
    if depth >= MAX_DEPTH:
        return []
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in pictures(v, kind, depth + 1)]
    if isinstance(value, dict):
        return [p for v in value.values() for p in pictures(v, None, depth + 1)]
    return []


def has_tensor(value, depth: int = 0) -> bool:
    if _is_tensor(value):
        return True
    if depth >= MAX_DEPTH:
        return False
    if isinstance(value, (list, tuple)):
        return any(has_tensor(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(has_tensor(v, depth + 1) for v in value.values())
    return False


def input_kinds(cls) -> dict:
    """{input name: declared type} for a node class (V1 INPUT_TYPES; V3 nodes expose it too)."""
    try:
        spec = cls.INPUT_TYPES()
    except Exception:
        return {}
    out = {}
    for section in ("required", "optional"):
        for name, info in (spec.get(section) or {}).items():
            if isinstance(info, (list, tuple)) and info and isinstance(info[0], str):
                out[name] = str(info[0])  # V3 types are str subclasses ("*" equals anything)
    return out


def return_kinds(cls) -> tuple:
    try:
        return tuple(str(t) for t in getattr(cls, "RETURN_TYPES", ()) or ())
    except Exception:
        return ()


_pure_cache: Tuple[Optional[int], frozenset] = (None, frozenset())


def is_pure(cls) -> bool:
    global _pure_cache
    import sys

    mappings = getattr(sys.modules.get("nodes"), "NODE_CLASS_MAPPINGS", None) or {}
    key = len(mappings)
    if _pure_cache[0] != key:
        _pure_cache = (key, pure_classes(mappings))
    return cls in _pure_cache[1]


# -- checking -------------------------------------------------------------------------------------

def as_frames(kind: str, tensor) -> List[np.ndarray]:
    """H x W x C float frames in 0..1; a mask becomes a grayscale RGB picture."""
    arr = tensor.detach().cpu().float().numpy()
    if kind == "MASK":
        if arr.ndim == 2:
            arr = arr[None]
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return list(arr)


def check_picture(kind: str, tensor, where: str, allow_censor: bool = False,
                  stage: str = "output"):
    """The picture itself when allowed (cached), its censored copy when the policy censors and
    `allow_censor` (an RGB IMAGE only), else raises: ConsentGuardRefusal when the policy
    refuses it (`stage` "input" for a loaded source picture, "output" for one a node made:
    which message the user sees), ConsentGuardError when it could not be checked."""
    now = state()
    key = digest(tensor)
    if CACHE.allowed(key, now):
        return tensor
    if tensor.numel() and bool(tensor.min() == tensor.max()):  # one flat colour shows nothing
        CACHE.add(key, now)
        return tensor
    engine = image_nodes.get_engine()
    frames = as_frames(kind, tensor)
    what = "mask" if kind == "MASK" else "image"
    verdicts = image_nodes.check_frames(engine, frames, where=where)
    failed = [v for v in verdicts if v.error]
    if failed:
        raise ConsentGuardError(f"Consent Guard could not check the {what} made by {where}, so "
                                f"the workflow stops here: {failed[0].error}")
    if all(v.allowed for v in verdicts):
        if binary_face(engine, frames):
            log.warning("Consent Guard (enforce): the %s made by %s shows a face in two tones "
                        "only; whether that is a protected person cannot be told", what, where)
            raise ConsentGuardRefusal(
                messages.INPUT_PROTECTED if stage == "input" else messages.OUTPUT_PROTECTED,
                where, f"Consent Guard (enforce mode) refused the {what} made by {where} (a "
                       f"face in two tones only)")
        CACHE.add(key, now)
        return tensor
    blocked = [i for i, v in enumerate(verdicts) if v.decision.value == "block"]
    censorable = allow_censor and not blocked and kind == "IMAGE" and tensor.shape[-1] == 3
    if not censorable:
        first = next(v for v in verdicts if not v.allowed)
        raise ConsentGuardRefusal(messages.kind_for(first, stage), where,
                                  f"Consent Guard (enforce mode) refused the {what} made by "
                                  f"{where}")
    out = frames_to_tensor([engine.render(f, v) for f, v in zip(frames, verdicts)])
    CACHE.add(digest(out), now)
    return out


BINARY_SHARE = 0.95  # of the pixels at the two commonest values: a two-tone picture


def two_tone(frame: np.ndarray) -> bool:
    """Whether a frame is (nearly) all two values: what a threshold or a colour-to-mask makes.
    Face recognition cannot tell who a two-tone face is (measured: the astronaut thresholded
    at its median matched her own photo at 0.13 cosine, under the 0.40 threshold)."""
    small = np.asarray(frame[::4, ::4]).mean(axis=-1) if frame.ndim == 3 else frame[::4, ::4]
    values, counts = np.unique(np.round(small * 255), return_counts=True)
    return len(values) >= 2 and np.sort(counts)[-2:].sum() >= BINARY_SHARE * small.size


def binary_face(engine, frames: List[np.ndarray]) -> bool:
    """A two-tone picture with a face in it while someone is protected: a way to carry a
    person's likeness (a face hidden as two nearly equal grey levels, then thresholded) that
    no identity check can judge, so enforce mode refuses it."""
    flat = [f for f in frames if two_tone(f)]
    if not flat:
        return False
    stage = engine.face_stage()
    if stage is None:
        return False
    from ..consent_guard.faces.stage import detect_faces
    from ..consent_guard.imageio import to_rgb_uint8

    return any(stage.matchable(detect_faces(stage.detector, to_rgb_uint8(f), stage.detect_size))
               for f in flat)


def plain(verdict) -> str:
    """The reason in words: minors and protected people by category only, never a name."""
    cats = {r.category for r in verdict.reasons}
    if any(c.startswith("minor") for c in cats):
        return "an explicit image of someone who may be a minor"
    if any(r.check == "face_match" or r.category == "protected_identity"
           for r in verdict.reasons):
        return "it shows a person who is protected from having their likeness used here"
    return verdict.summary()


def check_inputs(cls, input_data_all: dict, where: str, pure: bool = False
                 ) -> Tuple[dict, bool]:
    """Step 1: every picture among a node's inputs is checked (or found in the cache); a
    top-level RGB IMAGE the policy censors is replaced by its censored copy. A pure transform
    (`pure`) also takes derived pictures unchecked. Returns the inputs and whether any holds a
    tensor at all (images, masks, latents: an output node handed one must not print it)."""
    kinds = input_kinds(cls)
    any_tensor = False
    out = {}
    for name, values in (input_data_all or {}).items():
        kind = kinds.get(name)
        kind = kind if kind in VISUAL_TYPES else None
        listed = values if isinstance(values, list) else [values]
        new = []
        for value in listed:
            if has_tensor(value):
                any_tensor = True
                value = _checked(value, kind, f"{where} (input '{name}')", pure)
            new.append(value)
        out[name] = new if isinstance(values, list) else new[0]
    return out, any_tensor


def _checked(value, kind: Optional[str], where: str, pure: bool = False):
    found = pictures(value, kind)
    if pure:
        now = state()
        found = [(k, t) for k, t in found if not DERIVED.allowed(digest(t), now)]
    if len(found) == 1 and found[0][1] is value:
        return check_picture(found[0][0], value, where, allow_censor=True)
    for pkind, tensor in found:
        check_picture(pkind, tensor, where)
    return value


def check_outputs(cls, output, run: Optional[NodeRun], has_subgraph: bool = False):
    """Step 2: the output lists as execution.get_output_from_returns made them ([slot][call]),
    with every picture checked (censored copies put in place of a top-level RGB IMAGE);
    a pure transform's outputs are only noted as derived."""
    where = run.name if run is not None else f"a {getattr(cls, '__name__', 'node')} node"
    pure = run is not None and run.pure
    if has_subgraph:  # [(new_graph, result)]: links to new nodes are checked when they run
        for _graph, result in output:
            for value in (result or ()):
                for kind, tensor in pictures(value, None):
                    _after(kind, tensor, where, pure)
        return output
    kinds = return_kinds(cls)
    new_output = []
    for slot, values in enumerate(output):
        kind = kinds[slot] if slot < len(kinds) and kinds[slot] in VISUAL_TYPES else None
        if not isinstance(values, list):
            new_output.append(values)
            continue
        new_values = []
        for value in values:
            found = pictures(value, kind)
            if not pure and len(found) == 1 and found[0][1] is value:
                new_values.append(check_picture(found[0][0], value, where, allow_censor=True))
                continue
            for pkind, tensor in found:
                _after(pkind, tensor, where, pure)
            new_values.append(value)
        new_output.append(new_values)
    return new_output


def _after(kind: str, tensor, where: str, pure: bool) -> None:
    if pure:
        DERIVED.add(digest(tensor), state())
    else:
        check_picture(kind, tensor, where)


# -- text at the encoder -----------------------------------------------------------------------

def role_of(prompt_id, unique_id) -> str:
    """'negative' when the running prompt's roles say the node feeds only negative inputs that
    a sampler with cfg > 1 steers away from; otherwise 'positive' (unknown counts as positive)."""
    prompt = running_prompt(prompt_id)
    if prompt is None or unique_id is None:
        return "positive"
    hit = _roles.get(prompt_id)
    if hit is not None and hit[0] is prompt:
        roles = hit[1]
    else:  # once per run, not once per text encoded (a caption set may hold thousands)
        try:
            from . import prompt_guard

            roles = prompt_guard.node_roles(prompt)
        except Exception:
            log.exception("Consent Guard: the roles of the running prompt could not be read")
            return "positive"
        _roles.clear()  # ComfyUI runs one prompt at a time
        _roles[prompt_id] = (prompt, roles)
    return "negative" if roles.get(str(unique_id)) == "negative" else "positive"


_roles: dict = {}  # prompt_id -> (the prompt, its node roles)


def running_prompt(prompt_id) -> Optional[dict]:
    """The API-format prompt ComfyUI is running (execution.py PromptQueue.currently_running:
    {item id: (number, prompt_id, prompt, extra_data, outputs_to_execute)})."""
    try:
        import server as comfy_server

        queue = comfy_server.PromptServer.instance.prompt_queue
        for item in list(queue.currently_running.values()):
            if item[1] == prompt_id:
                return item[2]
    except Exception:
        return None
    return None


def check_encoder_text(text) -> None:
    """Called with every text a CLIP tokenizer receives; raises when the policy refuses it."""
    if not isinstance(text, str) or not text.strip():
        return
    run = current.get()
    if run is not None and role_of(run.prompt_id, run.unique_id) == "negative":
        return
    _check_text(text, None, run.name if run is not None else "a text encoder", "encodes")


def _check_text(text: str, negative: Optional[str], where: str, verb: str) -> None:
    from . import prompt_guard

    engine = image_nodes.get_engine()
    verdict = prompt_guard.check_text(engine, text, negative)
    image_nodes.record(engine, "prompt", verdict, note=f"{where}: text it {verb}",
                       prompt=text, negative=negative)
    if verdict.error:
        raise ConsentGuardError(f"Consent Guard could not check the text that {where} {verb}, "
                                f"so the workflow stops here: {verdict.error}")
    if not verdict.allowed:
        raise ConsentGuardRefusal(prompt_guard.shown_kind(verdict), where,
                                  f"Consent Guard refuses the text that {where} {verb}")


API_NEGATIVES = ("negative_prompt",)  # comfy_api_nodes: the services' own negative prompts
MAX_STRINGS = 200  # strings read out of one API node's inputs


def check_api_text(cls, input_data_all: dict) -> None:
    """An API node (comfy_api_nodes/) sends its text to another service without a CLIP
    tokenizer: every string among its inputs is checked as the encoder's text is (strings
    built at run time included), its `negative_prompt` as the negative."""
    if not is_api_node(cls):
        return
    negatives, texts = [], []
    for name, values in (input_data_all or {}).items():
        found = _strings(values)
        (negatives if name in API_NEGATIVES else texts).extend(found)
    negative = "\n".join(t for t in negatives if t.strip()) or None
    run = current.get()
    where = run.name if run is not None else getattr(cls, "__name__", "an API node")
    for text in dict.fromkeys(t for t in texts if t.strip()):
        _check_text(text, negative, where, "sends")


def _strings(value, depth: int = 0, out: Optional[list] = None) -> List[str]:
    out = [] if out is None else out
    if len(out) >= MAX_STRINGS:
        raise ConsentGuardError("Consent Guard (enforce mode) refuses an API node with more "
                                f"than {MAX_STRINGS} strings among its inputs")
    if isinstance(value, str):
        out.append(value)
    elif depth < MAX_DEPTH and isinstance(value, (list, tuple)):
        for v in value:
            _strings(v, depth + 1, out)
    elif depth < MAX_DEPTH and isinstance(value, dict):
        for v in value.values():
            _strings(v, depth + 1, out)
    return out


def wrap_tokenize(original: Callable, enforce_on: Callable[[], bool]):
    import functools

    @functools.wraps(original)
    def tokenize(self, text, *args, **kwargs):
        if enforce_on():
            check_encoder_text(text)
        return original(self, text, *args, **kwargs)
    tokenize.consent_guard_hook = True
    return tokenize
