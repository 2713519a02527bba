"""Image nodes: check a batch, and save or preview only what the policy allows.

ConsentGuardSaveImage and ConsentGuardPreviewImage follow nodes.SaveImage / nodes.PreviewImage
(ComfyUI a125cd84, nodes.py): same inputs, hidden PROMPT / EXTRA_PNGINFO, same file naming
(`{prefix}_{counter:05}_.png`, `%batch_num%`), `args.disable_metadata` respected for the prompt.
"""
from __future__ import annotations

import json
import logging
import os
import random
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import folder_paths
from comfy.cli_args import args

from ..consent_guard import Engine, messages, provenance
from ..consent_guard.censor import placeholder_for
from ..consent_guard.verdict import Decision, Verdict
from . import comfy_bridge
from .comfy_bridge import (REFUSAL_EVENT, ConsentGuardError, ConsentGuardRefusal, checks_state,
                           client_id, contact, engine_for, frames_to_tensor, get_engine,
                           progress, send_event, tensor_to_frames, ui_locale)

log = logging.getLogger("consent_guard")
CATEGORY = "Consent Guard"
CHUNK = 16  # frames per engine call: progress for long batches, bounded memory
OVERRIDE_INPUT = {"policy_override": ("STRING", {
    "multiline": True, "default": "",
    "tooltip": "Optional policy keys (TOML) for this node only, e.g. [actions] nudity = "
               "\"block\". When the admin has locked Consent Guard, only stricter values "
               "apply."})}


def record(engine: Engine, kind: str, verdict: Verdict, note: Optional[str] = None,
           image=None, **extra) -> Optional[int]:
    """One audit record; its number (the provenance mark carries it), or None when there is
    no audit log or it could not be written. In enforce mode a record that cannot be written
    stops the save. `extra`: prompt, negative, client_id (default: the running prompt's
    client)."""
    audit = getattr(engine, "audit", None)
    if audit is None:
        return None
    extra.setdefault("client_id", client_id())
    seq = audit.append(kind, verdict, source="comfyui", image=image, note=note, **extra)
    if seq is None and engine.policy.enforce:
        raise ConsentGuardError("Consent Guard cannot write its audit log, and in enforce mode "
                                "nothing is saved unlogged: " + str(audit.last_error))
    return seq


def stamp(engine: Engine, pixels: np.ndarray, verdict: Verdict,
          record_id: Optional[int]) -> provenance.Stamp:
    """The invisible mark and the signed verdict for pixels about to be saved, as the policy's
    [provenance] asks (consent_guard/provenance.py); a stamp that cannot be made stops the
    save (fail closed)."""
    try:
        return provenance.stamp(pixels, verdict, policy=engine.policy, home=comfy_bridge.home(),
                                record_id=record_id,
                                model_dirs=comfy_bridge.HOST.model_dirs())
    except provenance.ProvenanceError as exc:
        raise ConsentGuardError(f"Consent Guard could not stamp the image, so it was not "
                                f"saved: {exc}") from exc


def check_frames(engine: Engine, frames: List[np.ndarray], inputs: bool = False,
                 where: str = "") -> List[Verdict]:
    """Every frame, in chunks, all under the one engine (so one policy) of this node run, each
    decision recorded in the audit log. `inputs`: check them as img2img / inpaint / face-swap
    sources instead of as outputs."""
    return check_and_number(engine, frames, inputs, where)[0]


def check_and_number(engine: Engine, frames: List[np.ndarray], inputs: bool = False,
                     where: str = "") -> Tuple[List[Verdict], List[Optional[int]]]:
    """check_frames(), and the number of each frame's audit record (None: not recorded)."""
    check = engine.check_input_images if inputs else engine.check_images
    bar = progress(len(frames)) if len(frames) > CHUNK else None
    verdicts: List[Verdict] = []
    for start in range(0, len(frames), CHUNK):
        verdicts.extend(check(frames[start:start + CHUNK]))
        if bar is not None:
            bar.update(min(CHUNK, len(frames) - start))
    kind = "input_image" if inputs else "image"
    numbers = [record(engine, kind, verdict, image=frame,
                      note=f"{where} frame {i + 1} of {len(frames)}" if where else None)
               for i, (frame, verdict) in enumerate(zip(frames, verdicts))]
    return verdicts, numbers


def check_inputs(engine, images, where: str) -> None:
    """Refuse source images that show someone protected under scope `any` (raises
    ConsentGuardRefusal with the plain reason, never the person's name or registry id); a
    check that cannot run stops the run as an error (ConsentGuardError)."""
    frames = tensor_to_frames(images)
    verdicts = check_frames(engine, frames, inputs=True, where=where)
    failed = [v for v in verdicts if v.error]
    if failed:
        raise ConsentGuardError(f"Consent Guard could not check {len(failed)} of "
                                f"{len(frames)} input image(s), so the workflow stops "
                                f"here: {failed[0].error}")
    refused = [i for i, v in enumerate(verdicts) if not v.allowed]
    if refused:  # the audit log has the details; the user is told the plain reason
        raise ConsentGuardRefusal(messages.kind_for(verdicts[refused[0]], "input"), where,
                                  f"Consent Guard refuses input image {refused[0] + 1} of "
                                  f"{len(frames)}")


def blocked_notice(verdicts: List[Verdict], where: str) -> bool:
    """Tell the browser that pictures were blocked and not shown (web/js/refusals.js makes a
    toast of it; the run goes on): the plain reason of the first, and how many."""
    blocked = [v for v in verdicts if not v.allowed and v.decision is Decision.BLOCK]
    if not blocked:
        return False
    kind = messages.kind_for(blocked[0], "output")
    return send_event(REFUSAL_EVENT, messages.payload(
        kind, contact(), ui_locale(), where=where, blocked=len(blocked), total=len(verdicts),
        stopped=False, node=_running_node()))


def _running_node() -> Optional[str]:
    """The id of the node that runs (execution.py sets PromptServer.last_node_id)."""
    try:
        import server as comfy_server

        node = getattr(comfy_server.PromptServer.instance, "last_node_id", None)
        return None if node is None else str(node)
    except Exception:
        return None


class _PolicyBound:
    """ComfyUI reuses a node's cached output while its inputs are unchanged (execution.py,
    IsChangedCache); a changed policy or registry must count as a change, or a re-run after
    tightening the policy or enrolling someone would hand on images checked before."""

    @classmethod
    def IS_CHANGED(cls, **_constant_inputs):
        return repr(checks_state())


def report(verdicts: List[Verdict]) -> dict:
    return {"decision": Decision.strictest(v.decision for v in verdicts).value,
            "images": [{"index": i, **v.to_dict()} for i, v in enumerate(verdicts)]}


def shown(engine, frame: np.ndarray, verdict: Verdict, locale: Optional[str] = None
          ) -> np.ndarray:
    """What is shown in a picture's place: itself, a censored copy, or a placeholder that
    says why in words (never labels or scores), in the UI's language when known."""
    out = None if verdict.error else engine.render(frame, verdict)
    if out is not None:
        return out
    h, w = np.asarray(frame).shape[:2]
    return placeholder_for(w, h, verdict, locale)


class ConsentGuardCheckImage(_PolicyBound):
    """IMAGE -> IMAGE: each frame checked; censored or replaced by a placeholder where the policy
    says so. Any frame that could not be checked stops the workflow (fail closed)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "Images to check, any batch size."})},
                "optional": dict(OVERRIDE_INPUT)}

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "report")
    FUNCTION = "check"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Checks every image for explicit content and protected people. Passes "
                   "allowed images through, censors or replaces the others, and returns a JSON "
                   "report.")

    def check(self, images, policy_override=""):
        engine = engine_for(get_engine(), policy_override)
        frames = tensor_to_frames(images)
        verdicts = check_frames(engine, frames, where="Check Image")
        failed = [v for v in verdicts if v.error]
        if failed:
            raise ConsentGuardError(f"Consent Guard could not check {len(failed)} of "
                                    f"{len(frames)} image(s), so the workflow stops here: "
                                    f"{failed[0].error}")
        if all(v.allowed for v in verdicts):  # nothing censored or replaced: the batch goes
            return (images, json.dumps(report(verdicts)))  # on as it came, no 8-bit round trip
        locale = ui_locale() if any(not v.allowed for v in verdicts) else None
        out = [shown(engine, f, v, locale) for f, v in zip(frames, verdicts)]
        for i, v in enumerate(verdicts):
            if not v.allowed:
                log.warning("Consent Guard: image %d of %d %s", i + 1, len(frames), v.summary())
        blocked_notice(verdicts, "Check Image")
        return (frames_to_tensor(out), json.dumps(report(verdicts)))


class ConsentGuardCheckInput(_PolicyBound):
    """IMAGE -> IMAGE, placed after LoadImage: refuses a photo of someone protected under scope
    `any` as a source for img2img, inpainting or face swap. The images pass through unchanged
    when allowed; otherwise the workflow stops with the reason (never the person's name)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "Source images (from Load Image)."})}}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "check"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Checks source images for people who asked not to be used: put it right "
                   "after Load Image, before img2img, inpainting or face swap.")

    def check(self, images):
        check_inputs(get_engine(), images, "Check Input Image")
        return (images,)


class ConsentGuardSaveImage(_PolicyBound):
    """Drop-in for SaveImage: writes only what the policy allows; a blocked image is never
    written, and a placeholder saying why is shown in its place."""

    def __init__(self):
        self.output_dir = folder_paths.get_output_directory()
        self.type = "output"
        self.prefix_append = ""
        self.compress_level = 4

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to check and save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip":
                                    "The prefix for the file to save, as in Save Image."}),
            },
            "optional": dict(OVERRIDE_INPUT),
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Checks each image, then saves what the policy allows to the output folder."

    def _metadata(self, stamped: provenance.Stamp, prompt, extra_pnginfo) -> PngInfo:
        """ComfyUI's own metadata (unless --disable-metadata), then the verdict and, when
        the policy signs, the signed verdict (consent_guard/provenance.py)."""
        metadata = PngInfo()
        if not args.disable_metadata:
            if prompt is not None:
                metadata.add_text("prompt", json.dumps(prompt))
            if extra_pnginfo is not None:
                for key in extra_pnginfo:
                    if key not in (provenance.VERDICT_KEY, provenance.METADATA_KEY):
                        metadata.add_text(key, json.dumps(extra_pnginfo[key]))
        for key, text in stamped.text_chunks().items():
            metadata.add_text(key, text)
        return metadata

    @staticmethod
    def _stamps(engine: Engine, frames, verdicts, numbers) -> List[Optional[provenance.Stamp]]:
        """What each frame is saved as (None: not saved), all made before anything is
        written, so a stamp that fails leaves no part of the batch on disk."""
        out: List[Optional[provenance.Stamp]] = []
        for frame, verdict, number in zip(frames, verdicts, numbers):
            pixels = None if verdict.error else engine.render(frame, verdict)
            if pixels is None:
                out.append(None)
            elif provenance.enabled(engine.policy):
                out.append(stamp(engine, pixels, verdict, number))
            else:
                out.append(provenance.Stamp(pixels, provenance.verdict_summary(verdict)))
        return out

    @staticmethod
    def _placeholder(frame: np.ndarray, verdict: Verdict, locale: Optional[str] = None) -> dict:
        """Written to the temp folder (never output/), so the UI can show why."""
        temp_dir = folder_paths.get_temp_directory()
        h, w = frame.shape[:2]
        full, name, counter, sub, _ = folder_paths.get_save_image_path(
            "ConsentGuard_blocked", temp_dir, w, h)
        file = f"{name}_{counter:05}_.png"
        pixels = placeholder_for(w, h, verdict, locale)
        Image.fromarray(pixels).save(os.path.join(full, file), compress_level=1)
        return {"filename": file, "subfolder": sub, "type": "temp"}

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None,
                    policy_override=""):
        engine = engine_for(get_engine(), policy_override)
        frames = tensor_to_frames(images)
        verdicts, numbers = check_and_number(engine, frames, where=type(self).__name__)
        if all(v.error for v in verdicts):
            raise ConsentGuardError("Consent Guard could not check the images, so nothing was "
                                    f"saved: {verdicts[0].error}")
        stamps = self._stamps(engine, frames, verdicts, numbers)
        filename_prefix += self.prefix_append
        h, w = frames[0].shape[:2]
        full_output_folder, filename, counter, subfolder, filename_prefix = \
            folder_paths.get_save_image_path(filename_prefix, self.output_dir, w, h)
        results, notes = [], []
        locale = ui_locale() if any(not v.allowed for v in verdicts) else None
        for batch_number, (frame, verdict, stamped) in enumerate(zip(frames, verdicts, stamps)):
            notes.append(f"image {batch_number + 1}: {verdict.summary()}")
            if stamped is None:
                log.warning("Consent Guard: image %d not saved (%s)", batch_number + 1,
                            verdict.summary())
                results.append(self._placeholder(frame, verdict, locale))
                continue
            name = filename.replace("%batch_num%", str(batch_number))
            file = f"{name}_{counter:05}_.png"
            Image.fromarray(stamped.pixels).save(
                os.path.join(full_output_folder, file),
                pnginfo=self._metadata(stamped, prompt, extra_pnginfo),
                compress_level=self.compress_level)
            results.append({"filename": file, "subfolder": subfolder, "type": self.type})
            counter += 1
        blocked_notice(verdicts, "Save Image" if self.type == "output" else "Preview Image")
        return {"ui": {"images": results, "consent_guard": notes}}


class ConsentGuardPreviewImage(ConsentGuardSaveImage):
    """Drop-in for PreviewImage: the same checks, written to the temp folder."""

    def __init__(self):
        self.output_dir = folder_paths.get_temp_directory()
        self.type = "temp"
        self.prefix_append = "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz")
                                                for _ in range(5))
        self.compress_level = 1

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "optional": dict(OVERRIDE_INPUT),
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    DESCRIPTION = "Checks each image, then previews what the policy allows."


NODE_CLASS_MAPPINGS = {
    "ConsentGuardCheckImage": ConsentGuardCheckImage,
    "ConsentGuardCheckInput": ConsentGuardCheckInput,
    "ConsentGuardSaveImage": ConsentGuardSaveImage,
    "ConsentGuardPreviewImage": ConsentGuardPreviewImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConsentGuardCheckImage": "Consent Guard: Check Image",
    "ConsentGuardCheckInput": "Consent Guard: Check Input Image",
    "ConsentGuardSaveImage": "Consent Guard: Save Image",
    "ConsentGuardPreviewImage": "Consent Guard: Preview Image",
}
