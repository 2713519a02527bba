"""The checks of an A1111/Forge job, turned into the WebUI's actions. No decision is made here:
the engine decides (consent_guard/engine.py), this module stops the job, replaces a picture or
answers the API with the engine's verdict, and writes the audit log.

Where each check sits (the hooks are wired in scripts/consent_guard_checks.py; hook order and
signatures: Forge dfdcbab6 modules/scripts.py l.141-286, modules/processing.py l.815-1156):

* Texts, before any sampling (`before_process`; again in `process`, once the WebUI has put
  the styles into p.all_prompts; and in `before_process_batch`, for what a wildcard
  extension rewrote after that): the prompts, the hires prompts, the styles' texts, and the
  LoRA / hypernetwork / embedding names (`<lora:name:1>`; names are read with `_`, `-` and
  `.` as spaces too). Negative prompts are a safety tool and go with each check as its
  context, except when the CFG scale is <= 1: the sampler then follows the negative (uncond +
  cfg * (cond - uncond)), so a negative is checked as a prompt of its own.
* Source pictures (`before_process`): img2img init images, the inpaint mask, and every picture
  found in the scripts' arguments (ControlNet / IP-Adapter units, ReActor's source face:
  PIL images, arrays, base64 strings) go through Engine.check_input_images: a protected
  person under scope `any` stops the job.
* A refused job: the WebUI swallows exceptions raised in script hooks (ScriptRunner wraps each
  in try/except and goes on: HTTP 200, images saved), so a refusal is not an exception. It
  (1) marks the job (`p.consent_guard_refusal`), which every later gate obeys: nothing of that
  job is shown or saved but a placeholder; (2) interrupts it as the Interrupt button does
  (shared.state.interrupt(): the batch loop ends before sampling; a refusal found in
  `before_process_batch` also empties p.prompts, which ends the loop); (3) puts the message
  first in the job's info (the box under the gallery) and tries a gradio warning toast
  (gr.Warning; not seen in Forge's gradio 4.40 from a script hook); (4) tells the API guard
  (install_api_guard), which answers /sdapi/v1/txt2img and img2img with HTTP 403 and the
  message instead of the empty result (503 when the check could not run).
* Outputs: `postprocess_image` (and `postprocess_image_after_composite`) replace each picture
  with what the verdict allows: itself, a censored copy or a placeholder; `postprocess`
  checks what else the job returns (grid, masks, extra images such as ControlNet maps), so
  the API's base64 images are the replaced ones; `on_before_image_saved` is the last gate of
  every file written (samples, grids, "save a copy before ..." options, hires first pass,
  Extras): an error there becomes a placeholder, never the original, because the WebUI saves
  `params.image` whatever a callback raised. Extras run through an Extras script (gate_extras).
  Pictures already gated (or made by this module) are remembered by their RGB content, so a
  picture is checked once (Forge hides the infotext in a saved picture's alpha channel).
"""
from __future__ import annotations

import base64
import binascii
import contextvars
import hashlib
import io
import logging
import re
import threading
from collections import OrderedDict
from typing import Iterator, List, Optional, Tuple

import numpy as np

from consent_guard import censor, messages
from consent_guard.imageio import to_rgb_uint8
from consent_guard.verdict import Decision, Verdict

from . import bridge
from .bridge import ConsentGuardError, ConsentGuardRefusal

log = logging.getLogger("consent_guard")

REFUSAL_ATTR = "consent_guard_refusal"  # on p: the job's ConsentGuardRefusal
TEXTS_ATTR = "consent_guard_texts"  # on p: the (text, negative) pairs already checked
EXTRA_NETWORK = re.compile(r"<(\w+):([^:>]+)(?::[^>]*)?>")
NAME_SEPARATORS = re.compile(r"[_\-.]+")
MAX_SCRIPT_VALUES = 20_000  # values looked at in the scripts' arguments for pictures
MIN_B64_CHARS = 100  # shorter strings are not pictures


# -- a refused job ---------------------------------------------------------------------------

class ApiCall:
    """One /sdapi call under way (install_api_guard); `refusal` is set if its job is refused."""

    def __init__(self):
        self.refusal: Optional[ConsentGuardRefusal] = None


_api_call: contextvars.ContextVar = contextvars.ContextVar("consent_guard_api_call",
                                                           default=None)


def refusal_of(p) -> Optional[ConsentGuardRefusal]:
    return getattr(p, REFUSAL_ATTR, None) if p is not None else None


def refuse(p, refusal: ConsentGuardRefusal) -> ConsentGuardRefusal:
    """Stop the job: mark it, interrupt it, tell the user and the API caller. The first
    refusal of a job is the one shown."""
    first = refusal_of(p)
    if first is None:
        setattr(p, REFUSAL_ATTR, refusal)
        first = refusal
        text = refusal.text()
        log.warning("Consent Guard refused a job (%s): %s%s", refusal.where or "job", text,
                    f" [{refusal.detail}]" if refusal.detail else "")
        bridge.toast(text)
    call = _api_call.get()
    if call is not None and call.refusal is None:
        call.refusal = first
    try:
        bridge.interrupt()
    except Exception as exc:  # the gates still refuse every picture of this job
        log.error("Consent Guard: could not interrupt the job: %s", exc)
    return first


def _failed(where: str, exc: Exception) -> ConsentGuardRefusal:
    return ConsentGuardRefusal(messages.CHECK_FAILED, where, detail=str(exc))


def _record(engine, kind: str, verdict: Verdict, **extra) -> Optional[int]:
    """One audit record, and its number (None: no audit log, or not written); in enforce
    mode a record that cannot be written is an error (the caller then refuses: nothing runs
    unlogged)."""
    audit = getattr(engine, "audit", None)
    if audit is None:
        return None
    number = audit.append(kind, verdict, source=bridge.SOURCE, **extra)
    if number is None and engine.policy.enforce:
        raise ConsentGuardError("Consent Guard cannot write its audit log, and in enforce "
                                "mode nothing runs unlogged: " + str(audit.last_error))
    return number


# -- texts -----------------------------------------------------------------------------------

def _as_list(value) -> List[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return [value] if isinstance(value, str) else []


def _styled(text: str, styles, negative: bool) -> str:
    """The text with the job's styles applied, as processing.py setup_prompts will do
    (before_process runs before it); the text itself when there are no styles."""
    if not styles:
        return text
    from modules import shared

    table = shared.prompt_styles
    apply = table.apply_negative_styles_to_prompt if negative else table.apply_styles_to_prompt
    return apply(text, styles)


def network_names(text: str) -> List[str]:
    """The names in extra-network tags (`<lora:name:0.8>`, `<hypernet:name:1>`), read as
    words: a file name is text the user chose too."""
    return [NAME_SEPARATORS.sub(" ", m.group(2)).strip() for m in EXTRA_NETWORK.finditer(text)]


def _spelled_out(text: str) -> Optional[str]:
    """The text with `_`, `-` and `.` read as spaces (embedding and LoRA file names), or None
    when that changes nothing."""
    spaced = NAME_SEPARATORS.sub(" ", EXTRA_NETWORK.sub(" ", text))
    return spaced if spaced != text else None


def _cfg_follows_negative(scale) -> bool:
    """At a CFG scale <= 1 the negative is followed, not pushed away from."""
    try:
        return float(scale) <= 1.0
    except (TypeError, ValueError):
        return True  # unknown: the strict reading


def job_texts(p) -> List[Tuple[str, Optional[str]]]:
    """(text, negative context) pairs to check for the job, without repeats."""
    styles = getattr(p, "styles", None) or []
    pairs: List[Tuple[str, Optional[str]]] = []
    groups = [("prompt", "negative_prompt", "cfg_scale"),
              ("all_prompts", "all_negative_prompts", "cfg_scale")]
    if getattr(p, "enable_hr", False):
        groups += [("hr_prompt", "hr_negative_prompt", "hr_cfg"),
                   ("all_hr_prompts", "all_hr_negative_prompts", "hr_cfg")]
    for pos_name, neg_name, cfg_name in groups:
        positives = [_styled(t, styles, False) for t in _as_list(getattr(p, pos_name, None))]
        negatives = [_styled(t, styles, True) for t in _as_list(getattr(p, neg_name, None))]
        scale = getattr(p, cfg_name, None)
        if scale is None:  # hr_cfg is Forge's; A1111 uses the first pass's scale
            scale = getattr(p, "cfg_scale", 7.0)
        if _cfg_follows_negative(scale):
            positives, negatives = positives + negatives, []
        context = negatives[0] if len(set(negatives)) == 1 else None
        for i, text in enumerate(positives):
            neg = negatives[i] if i < len(negatives) else context
            pairs.append((text, neg))
            spelled = _spelled_out(text)
            if spelled:
                pairs.append((spelled, neg))
            names = network_names(text)
            if names:
                pairs.append((", ".join(names), None))
    return list(dict.fromkeys((t, n) for t, n in pairs if t and t.strip()))


def check_texts(p, where: str) -> Optional[ConsentGuardRefusal]:
    """Check the job's texts not yet checked; refuse the job on the first one not allowed.
    One audit record per call that checked anything."""
    done = getattr(p, TEXTS_ATTR, None)
    if done is None:
        done = set()
        setattr(p, TEXTS_ATTR, done)
    try:
        pairs = [pair for pair in job_texts(p) if pair not in done]
        if not pairs:
            return None
        engine = bridge.get_engine()
        verdicts = [engine.check_prompt(text, negative=neg) for text, neg in pairs]
        refused = [(pair, v) for pair, v in zip(pairs, verdicts) if not v.allowed]
        worst = refused[0][1] if refused else verdicts[0]
        _record(engine, "prompt", worst, prompt=(refused[0][0] if refused else pairs[0])[0],
                negative=(refused[0][0] if refused else pairs[0])[1],
                note=f"{where}: {len(pairs)} text(s), {len(refused)} refused")
        if refused:
            return refuse(p, ConsentGuardRefusal(messages.kind_for(worst, "prompt"), where,
                                                 detail=worst.summary()))
        done.update(pairs)
        return None
    except Exception as exc:  # fail closed: a check that cannot run stops the job
        return refuse(p, _failed(where, exc))


# -- source pictures -------------------------------------------------------------------------

def _decode_b64(text: str):
    """A picture sent as base64 text (the API: ControlNet units, ReActor's source), or None."""
    if len(text) < MIN_B64_CHARS:
        return None
    data = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image
    except Exception:
        return None


def _is_picture_array(value) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[2] in (3, 4) \
        and min(value.shape[:2]) >= 8


def pictures_in(value, limit: int = MAX_SCRIPT_VALUES) -> Iterator:
    """Every picture in a script argument: PIL images, H x W x 3|4 arrays and base64 text,
    inside lists, tuples, dicts and plain objects (ControlNet's units are dataclasses)."""
    from PIL import Image

    stack, seen, looked = [value], set(), 0
    while stack and looked < limit:
        item = stack.pop()
        looked += 1
        if item is None or isinstance(item, (bool, int, float, bytes)):
            continue
        if isinstance(item, Image.Image) or _is_picture_array(item):
            yield item
        elif isinstance(item, str):
            decoded = _decode_b64(item)
            if decoded is not None:
                yield decoded
        elif id(item) in seen or isinstance(item, np.ndarray):
            continue
        elif isinstance(item, dict):
            seen.add(id(item))
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            seen.add(id(item))
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type) and \
                type(item).__module__ not in ("builtins",) and not callable(item):
            seen.add(id(item))
            stack.extend(vars(item).values())


def job_inputs(p) -> List[Tuple[str, object]]:
    """(where, picture) for every source picture of the job."""
    found = [(f"init image {i + 1}", im) for i, im in
             enumerate(getattr(p, "init_images", None) or []) if im is not None]
    mask = getattr(p, "image_mask", None)
    if mask is not None:
        found.append(("inpaint mask", mask))
    args = getattr(p, "script_args", None)
    if args:
        found += [(f"script input {i + 1}", im) for i, im in enumerate(pictures_in(args))]
    return found


def to_rgb(picture) -> np.ndarray:
    """A PIL image or an array as RGB uint8 (alpha dropped: what is under it is still there)."""
    if hasattr(picture, "mode") and hasattr(picture, "convert"):
        if picture.mode not in ("RGB", "RGBA", "L"):
            picture = picture.convert("RGB")
        return to_rgb_uint8(np.asarray(picture))
    return to_rgb_uint8(np.asarray(picture))


def check_inputs(p, where: str = "source pictures") -> Optional[ConsentGuardRefusal]:
    """The job's source pictures through Engine.check_input_images; refuse on the first one
    not allowed (a protected person under scope `any`, or a check that could not run)."""
    try:
        found = job_inputs(p)
        if not found:
            return None
        engine = bridge.get_engine()
        rgbs = [to_rgb(picture) for _, picture in found]
        verdicts = engine.check_input_images(rgbs)
        for (name, _), rgb, verdict in zip(found, rgbs, verdicts):
            _record(engine, "input_image", verdict, image=rgb, note=f"{where}: {name}")
        for (name, _), verdict in zip(found, verdicts):
            if not verdict.allowed:
                return refuse(p, ConsentGuardRefusal(messages.kind_for(verdict, "input"),
                                                     name, detail=verdict.summary()))
        return None
    except Exception as exc:
        return refuse(p, _failed(where, exc))


# -- outputs ---------------------------------------------------------------------------------

class _Seen:
    """Pictures already gated, by RGB content (and engine, for a verdict): what may stand in
    their place (None: the picture itself). Pictures made here (censored copies,
    placeholders) pass. A later gate answers from here without checking again."""

    def __init__(self, size: int = 512):
        self._keys: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def add(self, key, replacement=None) -> None:
        with self._lock:
            self._keys[key] = replacement
            self._keys.move_to_end(key)
            while len(self._keys) > self._size:
                self._keys.popitem(last=False)

    def get(self, key, default=False):
        with self._lock:
            return self._keys.get(key, default)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._keys

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()


SEEN = _Seen()
VERDICTS = _Seen()  # RGB content of a picture let through (itself or a censored copy) -> verdict


def picture_key(picture) -> Tuple:
    """The picture's RGB content: what is checked (alpha is dropped). Forge writes the
    infotext into a saved picture's alpha channel before the save callbacks run
    (stealth_infotext.add_stealth_pnginfo), which must not make a checked picture new."""
    return rgb_key(to_rgb(picture))


def rgb_key(rgb: np.ndarray) -> Tuple:
    return (hashlib.blake2b(np.ascontiguousarray(rgb).tobytes(), digest_size=16).hexdigest(),
            rgb.shape)


def _pil(rgb: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))


def placeholder_for(picture, kind: str):
    """A placeholder the size of `picture` for a refusal kind."""
    w, h = getattr(picture, "size", None) or (64, 64)
    out = _pil(censor.placeholder(max(int(w), 1), max(int(h), 1), kind=kind,
                                  locale=bridge.ui_locale()))
    SEEN.add(picture_key(out))
    return _blocked(out)


BLOCKED_MARK = "consent_guard_blocked"  # an attribute on a placeholder PIL image


BLOCKED = _Seen()  # RGB contents of placeholders made here (survive Forge's RGBA copy)


def _blocked(picture):
    """Mark a placeholder, so the save gate keeps it out of outputs/ (before_image_saved):
    by an attribute, and by its RGB content, since Forge saves an RGBA copy of it (the
    infotext in its alpha) made before the save callbacks run."""
    setattr(picture, BLOCKED_MARK, True)
    BLOCKED.add(picture_key(picture))
    return picture


def is_blocked(picture) -> bool:
    if picture is None:
        return False
    if getattr(picture, BLOCKED_MARK, False):
        return True
    try:
        return picture_key(picture) in BLOCKED
    except Exception:
        return False


def blocked_folder() -> str:
    """Where a placeholder is written when the WebUI saves a blocked picture: the WebUI saves
    whatever before_image_saved leaves in params, and its gallery shows the saved file, so
    the file is redirected here, out of outputs/ (the system temp folder, never served
    beyond the gallery)."""
    import os
    import tempfile

    # One folder per account, owner-only: the WebUI may write the blocked job's infotext (its
    # prompt) beside the placeholder, and on a shared machine /tmp is everyone's.
    uid = getattr(os, "getuid", None)  # none on Windows, where the temp folder is per user
    name = "consent_guard_blocked" + (f"_{uid()}" if uid else "")
    folder = os.path.join(tempfile.gettempdir(), name)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return folder


def gate_picture(picture, where: str, p=None):
    """What may be saved or shown in the picture's place: itself, a censored copy or a
    placeholder. Never raises and never returns the original of a picture that was not
    allowed: any error gives a placeholder."""
    try:
        refusal = refusal_of(p)
        if refusal is not None:
            return placeholder_for(picture, refusal.kind)
        if picture is None:
            return picture
        rgb = to_rgb(picture)
        key = rgb_key(rgb)
        engine = bridge.get_engine()
        if key in SEEN:  # made here
            return picture
        known = SEEN.get((key, id(engine)))
        if known is not False:
            return picture if known is None else known
        verdict = engine.check_images([rgb])[0]
        _record(engine, "image", verdict, image=rgb, note=where)
        if verdict.allowed:
            SEEN.add((key, id(engine)))
            VERDICTS.add(key, verdict)
            return picture
        log.warning("Consent Guard: %s %s", where, verdict.summary())
        out = _pil(engine.output_for(rgb, verdict))
        if verdict.decision is Decision.CENSOR and not verdict.error:
            out.info.update(getattr(picture, "info", None) or {})
            VERDICTS.add(picture_key(out), verdict)
        else:
            _blocked(out)
        SEEN.add(picture_key(out))
        if not verdict.error:  # a failed check is tried again next time
            SEEN.add((key, id(engine)), out)
        return out
    except Exception as exc:  # fail closed
        log.error("Consent Guard could not check %s, so a placeholder is used: %s", where, exc)
        try:
            return placeholder_for(picture, messages.CHECK_FAILED)
        except Exception:
            return _pil(np.zeros((64, 64, 3), np.uint8))


def gate_list(pictures: list, where: str, p=None) -> None:
    """Gate every picture of a list in place (Processed.images, extra_images)."""
    for i, picture in enumerate(list(pictures)):
        if picture is None or isinstance(picture, str):
            continue
        pictures[i] = gate_picture(picture, f"{where} {i + 1}", p)


# -- the hooks (wired in scripts/consent_guard_checks.py) -------------------------------------

def before_job(p) -> Optional[ConsentGuardRefusal]:
    """Script.before_process: enforce settings, the texts, then the source pictures."""
    apply_enforce_settings()
    return check_texts(p, "prompt") or check_inputs(p)


def after_prompts(p) -> Optional[ConsentGuardRefusal]:
    """Script.process: p.all_prompts now holds the styles; check what is new. The job's
    override_settings (an API caller's `live_previews_enable: true`) were applied after
    before_process (processing.py l.826), so enforce mode's settings are applied again. A
    refused job is interrupted again (an extension may have reset the state)."""
    refusal = refusal_of(p)
    if refusal is not None:
        return refuse(p, refusal)
    apply_enforce_settings()  # the request's override_settings were applied since
    return check_texts(p, "prompt")


def before_batch(p) -> None:
    """Script.before_process_batch (before every batch, processing.py l.946): the texts once
    more (a wildcard extension whose `process` ran after ours rewrote p.all_prompts), and a
    refused job's batch is emptied: the WebUI ends the loop on `len(p.prompts) == 0` (l.949)
    before it builds the conditioning or samples."""
    refusal = refusal_of(p) or check_texts(p, "prompt")
    if refusal is None:
        return
    refuse(p, refusal)
    prompts = getattr(p, "prompts", None)
    if isinstance(prompts, list):
        prompts.clear()


def before_sampling(p) -> None:
    """process_batch / process_before_every_sampling: nothing of a refused job is sampled."""
    refusal = refusal_of(p)
    if refusal is not None:
        refuse(p, refusal)


def image_arg(pp):
    """PostprocessImageArgs: (image, index) in Forge, (image) in A1111; both have .image."""
    return pp.image


def postprocess_image(p, pp) -> None:
    index = getattr(pp, "index", None)
    where = "generated image" + (f" {index + 1}" if isinstance(index, int) else "")
    pp.image = gate_picture(image_arg(pp), where, p)


def postprocess(p, processed) -> None:
    """Script.postprocess: everything the job returns (and the API encodes) is gated."""
    for attr, where in (("images", "result image"), ("extra_images", "extra result image")):
        pictures = getattr(processed, attr, None)
        if isinstance(pictures, list):
            if refusal_of(p) is not None:  # asked each time: gating the first may refuse
                pictures.clear()
            else:
                gate_list(pictures, where, p)
    refusal = refusal_of(p)
    if refusal is not None:  # the info box under the gallery (the UI's html_info)
        note = f"Consent Guard: {refusal.text()}"
        info = getattr(processed, "info", "") or ""
        processed.info = note if not info else f"{note}\n{info}"


def before_image_saved(params) -> None:
    """on_before_image_saved (ImageSaveParams: image, p, filename, pnginfo): the last gate of
    every file. The WebUI saves params.image whatever a callback raised, so this replaces it
    and never raises."""
    try:
        params.image = gate_picture(params.image, f"file {params.filename}",
                                    getattr(params, "p", None))
        stamp_for_save(params)
    except BaseException as exc:  # noqa: B902 - nothing may leave the original in place
        log.error("Consent Guard: the save gate failed, a placeholder is saved: %s", exc)
        params.image = placeholder_for(getattr(params, "image", None), messages.CHECK_FAILED)
        if not isinstance(exc, Exception):
            raise
    finally:
        _keep_blocked_out_of_outputs(params)


def stamp_for_save(params) -> None:
    """After the save gate, as the policy's [provenance] asks: the picture about to be
    written gets the invisible mark, and a PNG gets the signed verdict in its text chunks
    (params.pnginfo). A JPEG or WebP is re-encoded lossily after this, so its pixels can
    never match a signature: it gets the mark only. The save is recorded in the audit log
    and the mark carries that record's number. Raises when the stamp cannot be made (the
    caller then saves a placeholder)."""
    import dataclasses
    import os

    from consent_guard import provenance

    image = getattr(params, "image", None)
    if image is None or is_blocked(image):
        return
    engine = bridge.get_engine()
    policy = engine.policy
    if not provenance.enabled(policy):
        return
    if os.path.splitext(str(params.filename))[1].lower() != ".png":
        policy = dataclasses.replace(policy, provenance_sign=False)
    rgb = to_rgb(image)
    verdict = VERDICTS.get(rgb_key(rgb), None) or Verdict(Decision.ALLOW,
                                                          rule="checked before saving")
    number = _record(engine, "image", verdict, image=rgb,
                     note=f"file {params.filename}: saved with the provenance mark")
    stamped = provenance.stamp(rgb, verdict, policy=policy, home=bridge.home(),
                               record_id=number, model_dirs=bridge.model_dirs())
    params.image = _with_alpha_of(image, _pil(stamped.pixels))
    SEEN.add(picture_key(params.image))
    if isinstance(getattr(params, "pnginfo", None), dict):
        params.pnginfo.update(stamped.text_chunks())


def _with_alpha_of(original, marked):
    """The marked picture with the original's alpha channel (Forge hides the infotext there)
    and its info."""
    if getattr(original, "mode", "") == "RGBA":
        marked = marked.convert("RGBA")
        marked.putalpha(original.getchannel("A"))
    marked.info.update(getattr(original, "info", None) or {})
    return marked


def _keep_blocked_out_of_outputs(params) -> None:
    """A blocked picture's placeholder is written to blocked_folder(), not where the WebUI
    meant to save it (outputs/...): nothing of a blocked job reaches the outputs folder,
    while the gallery still has a file to show. Its infotext .txt, if the WebUI writes one,
    goes along (it is named after the image). If the folder cannot be made, the placeholder
    is saved where the WebUI meant (never the original)."""
    if not is_blocked(getattr(params, "image", None)):
        return
    import os

    try:
        name = os.path.basename(str(params.filename)) or "blocked.png"
        params.filename = os.path.join(blocked_folder(), name)
    except Exception as exc:
        log.error("Consent Guard: a placeholder is saved in outputs/: %s", exc)


def gate_extras(pp) -> None:
    """An Extras script's process(pp): the picture Extras shows, saves and returns."""
    pp.image = gate_picture(pp.image, "Extras image")


# -- enforce mode ----------------------------------------------------------------------------

EXTRAS_SCRIPT_NAME = "Consent Guard"


def apply_enforce_settings() -> bool:
    """In enforce mode: live previews off, Consent Guard's Extras gate on, and the extension
    kept enabled while the admin lock is on. True when enforce mode is on."""
    try:
        on = bridge.enforce_on()
    except Exception:
        on = True  # fail closed
    if not on:
        return False
    for step in (bridge.previews_off, lambda: bridge.keep_extras_script(EXTRAS_SCRIPT_NAME),
                 guard_extension_settings):
        try:
            step()
        except Exception as exc:
            log.error("Consent Guard: enforce setting not applied: %s", exc)
    return True


def extension_name() -> str:
    """The extension's name in the WebUI: its folder's name (modules/extensions.py)."""
    from . import EXTENSION_ROOT
    import os

    return os.path.basename(EXTENSION_ROOT)


def _keep_enabled(opts) -> List[str]:
    """Take this extension out of the disabled list and undo "disable all extensions";
    returns what was undone."""
    undone = []
    name = extension_name()
    disabled = list(getattr(opts, "disabled_extensions", None) or [])
    if name in disabled:
        opts.disabled_extensions = [n for n in disabled if n != name]
        undone.append(f"disabled_extensions: {name}")
    if getattr(opts, "disable_all_extensions", "none") not in (None, "none"):
        undone.append(f"disable_all_extensions: {opts.disable_all_extensions}")
        opts.disable_all_extensions = "none"
    return undone


def guard_extension_settings() -> None:
    """While enforce mode and the admin lock are on, the extension cannot be switched off
    from Settings > Extensions (or /sdapi/v1/options): the WebUI stores that in config.json
    (`disabled_extensions`, `disable_all_extensions`, modules/extensions.py l.24-26) through
    shared.opts.save, so that save is wrapped to keep Consent Guard enabled. What no
    extension can stop (--disable-extra-extensions, --disable-all-extensions, a renamed or
    removed folder) is for `consent-guard doctor` to report."""
    from modules import shared

    opts = shared.opts
    if getattr(opts.save, "consent_guard", False):
        return
    original = opts.save

    def save(*args, **kwargs):
        try:
            if bridge.enforce_on() and bridge.HOST.locked():
                for what in _keep_enabled(opts):
                    log.warning("Consent Guard: enforce mode and the admin lock are on, so "
                                "the extension stays enabled (%s was refused)", what)
        except Exception as exc:
            log.error("Consent Guard: could not check the extension settings: %s", exc)
        return original(*args, **kwargs)

    save.consent_guard = True
    object.__setattr__(opts, "save", save)
    bridge.HOOKS["extension kept enabled (shared.opts.save)"] = "installed"


# -- the API guard ---------------------------------------------------------------------------

GUARDED_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")


def refusal_response(refusal: ConsentGuardRefusal):
    """The API's answer for a refused job: 403 with the message (503 when the check could not
    run), in the shape of the WebUI's own errors (error, detail, body, message)."""
    from starlette.responses import JSONResponse

    text = refusal.text()
    status = 503 if refusal.kind == messages.CHECK_FAILED else 403
    return JSONResponse(status_code=status, content={
        "error": "ConsentGuardRefusal", "detail": text, "body": "", "message": text,
        "consent_guard": refusal.payload()})


async def api_guard(request, call_next):
    """Middleware: a txt2img / img2img call whose job was refused gets the refusal, not the
    WebUI's HTTP 200 with an empty image list."""
    if request.url.path.rstrip("/") not in GUARDED_PATHS:
        return await call_next(request)
    call = ApiCall()
    token = _api_call.set(call)
    try:
        response = await call_next(request)
    finally:
        _api_call.reset(token)
    if call.refusal is None:
        return response
    return refusal_response(call.refusal)


def install_api_guard(app) -> None:
    """Put api_guard in front of the app's routes (on_app_started). The WebUI adds its own
    middleware after the app exists the same way (initialize_util.setup_middleware): insert
    into user_middleware and let the stack be rebuilt."""
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware

    if any(getattr(m, "kwargs", {}).get("dispatch") is api_guard or
           getattr(m, "options", {}).get("dispatch") is api_guard
           for m in app.user_middleware):
        return
    app.user_middleware.insert(0, Middleware(BaseHTTPMiddleware, dispatch=api_guard))
    app.middleware_stack = None  # rebuilt on the next request, with the guard outermost
    bridge.HOOKS["api guard (/sdapi/v1/txt2img, img2img)"] = "installed"
