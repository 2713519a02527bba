"""Enforce mode: whatever workflow runs, nothing reaches disk or the screen unchecked.

The hooks are installed whenever ComfyUI loads this package and act only while the policy
says `enforce = true` (read on every call, so turning it on needs no restart). Where they sit,
in ComfyUI a125cd84 (0.3.64):

* execution.py `get_output_data(prompt_id, unique_id, obj, input_data_all, ...)`: `execute()`
  calls it by its module-global name for every node that runs. Wrapped: for an output node
  (`OUTPUT_NODE`, which V3 nodes expose as a class property too), every IMAGE tensor
  [B, H, W, C] and every VIDEO (comfy_api VideoInput: its components' frames) among the inputs
  is checked first; blocked frames become placeholders, censored ones censored copies, and a
  check that cannot run raises, so the node never runs. This covers nodes.SaveImage /
  PreviewImage, comfy_extras SaveAnimatedWEBP / SaveAnimatedPNG / SaveWEBM / SaveVideo, and
  custom savers (e.g. video combiners) alike.
* nodes.py `SaveImage.save_images(self, images, filename_prefix, prompt, extra_pnginfo)`
  (PreviewImage inherits it) and comfy_api/latest/_ui.py `ImageSaveHelper.save_images /
  save_animated_png / save_animated_webp(images, filename_prefix, folder_type, cls, ...)`:
  wrapped too, for code that calls them outside a node's run; a batch already checked by the
  gate above is not checked twice.
* folder_paths.py `get_save_image_path(filename_prefix, output_dir, image_width, image_height)`:
  every saver asks it for a file name. While a node whose inputs were not checked runs (no
  IMAGE input: it made its picture itself), the folders and names it was given are noted; when
  it returns, new image files there are checked from disk and removed if not allowed, and new
  video files, which cannot be checked from disk here, are removed (fail closed).
* nodes.py `LoadImage.load_image(self, image)` (LoadImageOutput inherits it): the loaded
  picture and its mask are checked as sources (sources.check_picture, cached, so the
  generic check of what the node made finds them); a refused photo stops the workflow.
* latent_preview.py `get_previewer(device, latent_format)` returns None (no previews are
  made), and server.py `PromptServer.send_sync(event, data, sid)` drops the binary preview
  events (protocol.py BinaryEventTypes PREVIEW_IMAGE, UNENCODED_PREVIEW_IMAGE,
  PREVIEW_IMAGE_WITH_METADATA) that other code sends: previews are turned off, with a notice.
* server.py's own routes, through a middleware on `PromptServer.app` (nodes/http_guard.py):
  uploads are checked as inputs and go only into input/, /view and /userdata serve only
  images that passed the output check.
* Where pictures are made (nodes/sources.py): execution.py `get_output_from_returns(
  return_values, obj)` and the inputs seen by `get_output_data`: every IMAGE and MASK a node
  makes or is handed is checked unless it is a known pure transform of checked pictures;
  comfy/sd.py `CLIP.tokenize(text)`: every text is checked when an encoder receives it.
* execution.py `validate_prompt(prompt_id, prompt, partial_execution_list)`: refuses every
  submission while enforce mode is on and the hooks are not all in place (prestartup_script.py
  puts the same guard in before any custom node is imported, so a plugin that fails to import
  cannot leave ComfyUI running unprotected). The prompt check itself is prompt_guard.on_prompt.

How a refusal is shown (not safety hooks: without them a refusal still stops the run, only
less clearly; installed whatever the policy says, they act only on Consent Guard's refusals):
* execution.py `PromptExecutor.handle_execution_error(self, prompt_id, prompt,
  current_outputs, executed, error, ex)`: a ConsentGuardRefusal (an
  InterruptProcessingException, so execute() logs one line and no traceback, and the front end
  gets `execution_interrupted`, not the crash report of `execution_error`) is logged in one
  line and its plain message added with `self.add_message(REFUSAL_EVENT, ...)`: sent to the
  browser (web/js/refusals.js: a toast) and kept in the prompt's history status messages,
  where an API client reads it.
* execution.py `validate_prompt`: a prompt that prompt_guard.on_prompt replaced by refusal
  nodes is answered with prompt_guard.refusal_response (one message, the real node's id and
  class), before ComfyUI's own validation would repeat it.
"""
from __future__ import annotations

import contextvars
import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional


import numpy as np

from . import comfy_bridge, image_nodes, sources
from .pure_transforms import is_stock
from ..consent_guard import messages, provenance
from ..consent_guard.verdict import Decision, Verdict
from .comfy_bridge import (REFUSAL_EVENT, ConsentGuardError, ConsentGuardRefusal,
                           frames_to_tensor, tensor_to_frames)

log = logging.getLogger("consent_guard")

STATE_MODULE = "_consent_guard_enforce"  # shared with prestartup_script.py
IMAGE_SUFFIXES = {".png", ".apng", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v"}
PREVIEW_EVENTS = {1, 2, 4}  # protocol.py BinaryEventTypes: the three image previews
OWN_NODES = ("ConsentGuardSaveImage", "ConsentGuardPreviewImage")  # they check themselves

_saves: contextvars.ContextVar = contextvars.ContextVar("consent_guard_saves", default=None)
# The batches the gate let through during the node run under way ({id: tensor}): a saver the
# node calls is not made to check them again. Only within that one run: a tensor checked
# earlier may have been changed in place since by another node.
_gated: contextvars.ContextVar = contextvars.ContextVar("consent_guard_gated", default=None)


def _already_gated(images) -> bool:
    gated = _gated.get()
    return gated is not None and gated.get(id(images)) is images


def _remember(images) -> None:
    gated = _gated.get()
    if gated is not None:
        gated[id(images)] = images
HOOKS: Dict[str, str] = {}  # hook name -> "installed" or why not


def state():
    """The module prestartup_script.py made (or one made here): armed, problem, enforce."""
    mod = sys.modules.get(STATE_MODULE)
    if mod is None:
        import types
        mod = types.ModuleType(STATE_MODULE)
        mod.armed, mod.problem, mod.guarded = False, "Consent Guard has not finished loading", False
        mod.refusal = not_armed_error
        sys.modules[STATE_MODULE] = mod
    return mod


def enforce_on() -> bool:
    """The policy's `enforce`; a policy file that exists but cannot be read counts as on."""
    try:
        return bool(image_nodes.get_engine().policy.enforce)
    except ConsentGuardError:
        return comfy_bridge.policy_state()[1] is not None


# -- checking ----------------------------------------------------------------------------------

def _is_image(value) -> bool:
    shape = getattr(value, "shape", None)
    return hasattr(value, "detach") and shape is not None and len(shape) == 4 \
        and shape[-1] in (1, 3, 4) and shape[0] > 0


def gate_images(images, where: str, whole: bool = False):
    """The images as they may be saved or shown: blocked frames are left out (nothing of them
    is written, not even a placeholder), censored ones are censored copies. Raises
    ConsentGuardError when every frame is blocked, when `whole` (an animation or a video)
    and any frame is, or when a check cannot run: the node then does not run at all."""
    return _gate(images, where, whole)[0]


def _gate(images, where: str, whole: bool = False):
    """gate_images(), and the verdicts and audit record numbers of the frames it returns
    (None, None when they were checked before: where they were made, or by this node run)."""
    if _already_gated(images):
        return images, None, None
    now, key = sources.state(), sources.digest(images)
    if sources.CACHE.allowed(key, now):  # checked where it was made (nodes/sources.py)
        _remember(images)
        return images, None, None
    engine = image_nodes.get_engine()
    frames = tensor_to_frames(images)
    verdicts, numbers = image_nodes.check_and_number(engine, frames, where=where)
    failed = [v for v in verdicts if v.error]
    if failed:
        raise ConsentGuardError(f"Consent Guard could not check the images going into {where}, "
                                f"so nothing was saved or shown: {failed[0].error}")
    if all(v.allowed for v in verdicts):
        if sources.binary_face(engine, frames):
            raise ConsentGuardRefusal(
                messages.OUTPUT_PROTECTED, where,
                f"Consent Guard (enforce mode) refused the images going into {where} (a face "
                f"in two tones only, which cannot be told from a protected person)")
        sources.CACHE.add(key, now)
        _remember(images)
        return images, verdicts, numbers
    kept = [(f, v, n) for f, v, n in zip(frames, verdicts, numbers)
            if v.decision.value != "block"]
    blocked = [i + 1 for i, v in enumerate(verdicts) if v.decision.value == "block"]
    if blocked and (whole or not kept):
        first = verdicts[blocked[0] - 1]
        raise ConsentGuardRefusal(
            messages.kind_for(first, "output"), where,
            f"Consent Guard (enforce mode) blocked {len(blocked)} of {len(frames)} image(s) "
            f"going into {where}, so nothing was saved or shown")
    for i in blocked:
        log.warning("Consent Guard (enforce): %s image %d of %d left out (%s)", where, i,
                    len(frames), sources.plain(verdicts[i - 1]))
    if blocked:
        image_nodes.blocked_notice(verdicts, where)
    out = frames_to_tensor([engine.render(f, v) for f, v, _ in kept])
    sources.CACHE.add(sources.digest(out), now)  # what the policy lets through, as it is
    _remember(out)
    return out, [v for _, v, _ in kept], [n for _, _, n in kept]


# -- provenance (consent_guard/provenance.py) ---------------------------------------------------

def _saved_pixels(frame) -> np.ndarray:
    """The uint8 pixels a stock saver writes for a frame (nodes.SaveImage truncates)."""
    return np.clip(255.0 * np.asarray(frame, np.float32), 0, 255).astype(np.uint8)


def stamp_images(images, where: str):
    """Gates the images like gate_images, then marks and signs each frame the policy lets
    through ([provenance]); returns the tensor to save and the signed claims (a list, for
    the saver's extra_pnginfo; None when nothing was signed). A frame checked where it was
    made gets an audit record of its own here, so the mark points to a record of this save."""
    out, verdicts, numbers = _gate(images, where)
    engine = image_nodes.get_engine()
    if not provenance.enabled(engine.policy) or out.shape[-1] != 3:
        return out, None
    frames = [_saved_pixels(f) for f in tensor_to_frames(out)]
    if verdicts is None:
        verdicts = [Verdict(Decision.ALLOW, rule="checked where it was made")] * len(frames)
        numbers = [image_nodes.record(engine, "image", v, image=f,
                                      note=f"{where}: saved (checked where it was made)")
                   for f, v in zip(frames, verdicts)]
    stamps = [image_nodes.stamp(engine, f, v, n) for f, v, n in zip(frames, verdicts, numbers)]
    marked = frames_to_tensor([s.pixels for s in stamps])
    sources.CACHE.add(sources.digest(marked), sources.state())
    _remember(marked)
    return marked, provenance.batch_metadata(stamps)


def _with_signatures(input_data_all: dict, signed: list) -> dict:
    """The saver's extra_pnginfo (stock SaveImage writes each key as a PNG text chunk) with
    the signed claims added; a workflow's own keys of that name are replaced."""
    if "extra_pnginfo" not in input_data_all:
        return input_data_all
    values = input_data_all["extra_pnginfo"]
    values = values if isinstance(values, list) and values else [None]
    input_data_all = dict(input_data_all)
    input_data_all["extra_pnginfo"] = [
        {**(v if isinstance(v, dict) else {}), provenance.METADATA_KEY: signed} for v in values]
    return input_data_all


def _gate_video(video, where: str):
    components = video.get_components()
    images = gate_images(components.images, where, whole=True)
    if images is components.images:
        return video
    from comfy_api.latest._input_impl.video_types import VideoFromComponents
    from comfy_api.latest._util.video_types import VideoComponents

    return VideoFromComponents(VideoComponents(images=images, frame_rate=components.frame_rate,
                                               audio=components.audio))


def _gate_value(value, where: str, animated: bool = False):
    if _is_image(value):
        return gate_images(value, where, whole=animated), True
    if hasattr(value, "get_components") and hasattr(value, "save_to"):  # a VIDEO input
        return _gate_video(value, where), True
    return value, False


def gate_inputs(class_name: str, input_data_all: dict):
    """input_data_all as execution.get_output_data takes it ({name: [value per call]}), with
    every image and video checked, still images marked and signed ([provenance]; the signed
    claims go into the node's extra_pnginfo); and whether there was any."""
    gated, any_visual, signed = {}, False, []
    animated = _animated(class_name)
    for name, values in input_data_all.items():
        if not isinstance(values, list):
            gated[name] = values
            continue
        new = []
        for v in values:
            where = f"{class_name} ('{name}')"
            if _is_image(v) and not animated:
                v, claims = stamp_images(v, where)
                signed += claims or []
                visual = True
            else:
                v, visual = _gate_value(v, where, animated)
            any_visual |= visual
            new.append(v)
        gated[name] = new
    if signed:
        gated = _with_signatures(gated, signed)
    return gated, any_visual


def _animated(class_name: str) -> bool:
    """Savers that write a batch as one animation or video: a frame cannot be left out."""
    name = class_name.lower()
    return any(w in name for w in ("animated", "video", "webm", "gif", "combine"))


def _output_node(cls) -> bool:
    try:
        return getattr(cls, "OUTPUT_NODE", False) is True
    except Exception:  # a V3 schema that cannot be built: treat it as an output
        return True


def _class_name(cls) -> str:
    return getattr(cls, "__name__", str(cls))


def sweep(saves: List[tuple], since: float, where: str) -> List[str]:
    """Check the files a node wrote through get_save_image_path without its inputs having been
    checked; remove what may not be kept. Returns what was removed (for the message)."""
    removed = []
    engine = image_nodes.get_engine()
    for folder, prefix in dict.fromkeys(saves):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in sorted(names):
            path = Path(folder) / name
            if not name.startswith(prefix) or not path.is_file():
                continue
            try:
                if path.stat().st_mtime < since:
                    continue
            except OSError:
                continue
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                verdict = engine.check_file(path)
                image_nodes.record(engine, "image", verdict, note=f"{where}: {name} (from disk)")
                if verdict.allowed:
                    continue
                why = verdict.summary()
            elif suffix in VIDEO_SUFFIXES:
                why = "a video whose frames were not checked before it was written"
            else:
                continue  # audio, models, latents: nothing to see
            try:
                path.unlink()
                removed.append(f"{name} ({why})")
            except OSError as exc:
                raise ConsentGuardError(f"Consent Guard could not remove {path}, which it may "
                                        f"not keep ({why}): {exc}") from exc
    return removed


# -- hooks ---------------------------------------------------------------------------------------

def _wrap_get_output_data(original):
    @functools.wraps(original)
    async def get_output_data(prompt_id, unique_id, obj, input_data_all, *args, **kwargs):
        if not enforce_on():
            return await original(prompt_id, unique_id, obj, input_data_all, *args, **kwargs)
        cls = obj if isinstance(obj, type) else type(obj)
        name = _class_name(cls)
        visual = False
        gated_token = _gated.set({})
        run = sources.NodeRun(prompt_id, unique_id, cls, sources.is_pure(cls))
        run_token = sources.current.set(run)
        try:
            if _output_node(cls) and name not in OWN_NODES:
                input_data_all, visual = gate_inputs(name, input_data_all)
            # every picture the node is handed was checked where it was made, or is now
            input_data_all, run.inputs_have_tensors = sources.check_inputs(
                cls, input_data_all, run.name, run.pure)
            sources.check_api_text(cls, input_data_all)  # text sent to another service
            saves: List[tuple] = []
            token = _saves.set(None if visual else saves)
            since = time.time() - 1.0  # file times may be coarse
            try:
                result = await original(prompt_id, unique_id, obj, input_data_all, *args,
                                        **kwargs)
            finally:
                _saves.reset(token)
        finally:
            sources.current.reset(run_token)
            _gated.reset(gated_token)
        if (visual and is_stock(cls)) or name in OWN_NODES:
            _written_after_check(result, since)
        if saves:
            removed = sweep(saves, since, name)
            if removed:
                raise ConsentGuardError(f"Consent Guard removed what {name} (node {unique_id}) "
                                        f"wrote: {'; '.join(removed)}")
        return result
    get_output_data.consent_guard_hook = True
    return get_output_data


def _written_after_check(result, since: float) -> None:
    """The files a stock saver (or one of ours) wrote from pictures the gate let through, as
    its UI result lists them ({"filename", "subfolder", "type"}): /view need not check them
    again (nodes/http_guard.py)."""
    import folder_paths

    from . import http_guard

    ui = result[1] if isinstance(result, tuple) and len(result) > 1 else None
    for item in (ui or {}).get("images", []) if isinstance(ui, dict) else []:
        try:
            folder = folder_paths.get_directory_by_type(item.get("type", "output"))
            path = Path(folder) / item.get("subfolder", "") / item["filename"]
        except Exception:
            continue
        http_guard.remember_written(path, since)


def _wrap_get_output_from_returns(original):
    """execution.get_output_from_returns(return_values, obj) -> (output, ui, has_subgraph):
    get_output_data calls it, and execute() calls it for nodes that ran asynchronously. What
    a node made is checked here (nodes/sources.py), and an output node that was handed a
    tensor shows no text (PreviewAny prints a mask's values)."""
    @functools.wraps(original)
    def get_output_from_returns(return_values, obj):
        output, ui, has_subgraph = original(return_values, obj)
        if not enforce_on():
            return output, ui, has_subgraph
        cls = obj if isinstance(obj, type) else type(obj)
        run = sources.current.get()
        if run is not None and run.cls is not cls:
            run = None  # not the node whose run set it: check as an unknown source
        if run is not None:
            run.digests.clear()  # the node may have changed its inputs in place
        output = sources.check_outputs(cls, output, run, has_subgraph)
        if ui and "text" in ui and (run is None or run.inputs_have_tensors or any(
                "tensor(" in str(t) for t in ui["text"])):  # printed from deeper inside
            ui = dict(ui)
            ui["text"] = [TEXT_WITHHELD]
            log.warning("Consent Guard (enforce): %s would have shown tensor values as "
                        "text; withheld", run.name if run is not None else _class_name(cls))
        return output, ui, has_subgraph
    get_output_from_returns.consent_guard_hook = True
    return get_output_from_returns


TEXT_WITHHELD = ("[Consent Guard enforce mode: the values of images, masks and latents are "
                 "not shown as text]")


def _wrap_save_path(original):
    @functools.wraps(original)
    def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
        result = original(filename_prefix, output_dir, image_width, image_height)
        saves = _saves.get()
        if saves is not None:
            saves.append((result[0], result[1].split("%batch_num%")[0]))
        return result
    get_save_image_path.consent_guard_hook = True
    return get_save_image_path


def _wrap_saver(original, where: str, images_at: int = 0):
    """A function whose argument `images` (or positional `images_at`) gets gated."""
    @functools.wraps(original)
    def saver(*args, **kwargs):
        if enforce_on():
            if "images" in kwargs:
                kwargs["images"] = gate_images(kwargs["images"], where)
            elif len(args) > images_at:
                args = list(args)
                args[images_at] = gate_images(args[images_at], where)
        return original(*args, **kwargs)
    saver.consent_guard_hook = True
    return saver


def _wrap_load_image(original):
    @functools.wraps(original)
    def load_image(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if enforce_on():  # a source: checked here, and found in the cache afterwards
            where = f"{type(self).__name__} (loading a picture)"
            out = tuple(out)
            image = sources.check_picture("IMAGE", out[0], where, allow_censor=True,
                                          stage="input")
            for extra in out[1:]:
                if sources.looks_like_mask(extra):
                    sources.check_picture("MASK", extra, where, stage="input")
            out = (image,) + out[1:]
        return out
    load_image.consent_guard_hook = True
    return load_image


def _wrap_previewer(original):
    @functools.wraps(original)
    def get_previewer(*args, **kwargs):
        if enforce_on():
            _preview_notice()
            return None
        return original(*args, **kwargs)
    get_previewer.consent_guard_hook = True
    return get_previewer


def _wrap_send_sync(original):
    @functools.wraps(original)
    def send_sync(event, data, sid=None):
        if event in PREVIEW_EVENTS and enforce_on():
            _preview_notice()
            return None
        return original(event, data, sid)
    send_sync.consent_guard_hook = True
    return send_sync


_noticed = False


def _preview_notice():
    global _noticed
    if not _noticed:
        _noticed = True
        log.warning("Consent Guard (enforce): live previews while sampling are turned off; "
                    "every finished image is checked before it is shown.")


def not_armed_error() -> Optional[tuple]:
    """validate_prompt's refusal while enforce mode is on and protection is not in place."""
    st = state()
    if st.armed or not enforce_on_safely():
        return None
    message = ("Consent Guard enforce mode is on, but its protection is not in place, so "
               "nothing is queued: " + (st.problem or "unknown problem"))
    return (False, {"type": "consent_guard_not_active", "message": message,
                    "details": message, "extra_info": {}}, [], {})


def enforce_on_safely() -> bool:
    try:
        return enforce_on()
    except Exception:
        return True


def _patch(owner, attr: str, wrap, name: str) -> None:
    current = getattr(owner, attr)
    if getattr(current, "consent_guard_hook", False):
        HOOKS[name] = "installed"
        return
    setattr(owner, attr, wrap(current))
    HOOKS[name] = "installed"


def _try(name: str, fn) -> None:
    try:
        fn()
    except Exception as exc:
        HOOKS[name] = f"not installed: {type(exc).__name__}: {exc}"
        log.error("Consent Guard: hook %s not installed: %s", name, exc)


def install(prompt_handler_added: bool) -> Dict[str, str]:
    """Install every hook (idempotent); arm enforce mode only when all are in place."""
    import folder_paths

    _try("execution.get_output_data", lambda: _patch(
        sys.modules["execution"] if "execution" in sys.modules else __import__("execution"),
        "get_output_data", _wrap_get_output_data, "execution.get_output_data"))
    _try("execution.get_output_from_returns", lambda: _patch(
        sys.modules["execution"] if "execution" in sys.modules else __import__("execution"),
        "get_output_from_returns", _wrap_get_output_from_returns,
        "execution.get_output_from_returns"))

    def tokenizer():
        import comfy.sd
        _patch(comfy.sd.CLIP, "tokenize", lambda f: sources.wrap_tokenize(f, enforce_on),
               "comfy.sd.CLIP.tokenize")

    _try("comfy.sd.CLIP.tokenize", tokenizer)
    _try("folder_paths.get_save_image_path", lambda: _patch(
        folder_paths, "get_save_image_path", _wrap_save_path,
        "folder_paths.get_save_image_path"))

    def comfy_nodes():
        mod = sys.modules.get("nodes")
        if mod is None or not hasattr(mod, "SaveImage"):
            raise ImportError("ComfyUI's nodes module is not loaded")
        return mod

    _try("nodes.SaveImage.save_images", lambda: _patch(
        comfy_nodes().SaveImage, "save_images",
        lambda f: _wrap_saver(f, "SaveImage", images_at=1), "nodes.SaveImage.save_images"))
    _try("nodes.LoadImage.load_image", lambda: _patch(
        comfy_nodes().LoadImage, "load_image", _wrap_load_image, "nodes.LoadImage.load_image"))

    def ui_helper():
        from comfy_api.latest._ui import ImageSaveHelper
        for attr in ("save_images", "save_animated_png", "save_animated_webp"):
            current = ImageSaveHelper.__dict__[attr]
            fn = current.__func__ if isinstance(current, staticmethod) else current
            if not getattr(fn, "consent_guard_hook", False):
                setattr(ImageSaveHelper, attr,
                        staticmethod(_wrap_saver(fn, f"ImageSaveHelper.{attr}")))
        HOOKS["comfy_api.latest._ui.ImageSaveHelper"] = "installed"

    _try("comfy_api.latest._ui.ImageSaveHelper", ui_helper)

    def previews():
        import latent_preview
        _patch(latent_preview, "get_previewer", _wrap_previewer, "latent_preview.get_previewer")
        import server
        instance = server.PromptServer.instance
        if instance is None:
            raise RuntimeError("no PromptServer instance")
        _patch(instance, "send_sync", _wrap_send_sync, "PromptServer.send_sync")
        HOOKS["previews"] = "installed"

    _try("previews", previews)

    def guard():
        import execution
        install_validate_guard(execution)
        HOOKS["execution.validate_prompt"] = "installed"

    _try("execution.validate_prompt", guard)

    def http_guard():
        import server
        from . import http_guard as http
        http.install(server.PromptServer.instance)
        HOOKS[http.HOOK_NAME] = "installed"

    _try("PromptServer.app middleware (uploads, /view)", http_guard)
    install_shown()
    HOOKS["prompt handler"] = "installed" if prompt_handler_added else "not installed"
    missing = [f"{k} ({v})" for k, v in HOOKS.items() if v != "installed"]
    st = state()
    st.armed = not missing
    st.problem = None if not missing else "hooks missing: " + "; ".join(missing)
    if missing:
        log.error("Consent Guard: %s; in enforce mode nothing is queued", st.problem)
    return dict(HOOKS)


def install_validate_guard(execution) -> None:
    """Wrap execution.validate_prompt so that it refuses while not_armed_error() says so
    (prestartup_script.py has its own copy of this, for when this package cannot load)."""
    state().refusal = not_armed_error  # what the guard asks, whoever installed it
    current = execution.validate_prompt
    if getattr(current, "consent_guard_hook", False):
        return

    @functools.wraps(current)
    async def validate_prompt(*args, **kwargs):
        refusal = state().refusal()
        if refusal is not None:
            log.error("Consent Guard: %s", refusal[1]["message"])
            return refusal
        return await current(*args, **kwargs)
    validate_prompt.consent_guard_hook = True
    execution.validate_prompt = validate_prompt


# -- how refusals are shown -------------------------------------------------------------------

SHOWN: Dict[str, str] = {}  # the hooks that show refusals -> "installed" or why not


def _wrap_handle_execution_error(original):
    """PromptExecutor.handle_execution_error: ComfyUI's own report (execution_interrupted for
    a refusal), then one log line and the refusal's plain message (module docstring)."""
    @functools.wraps(original)
    def handle_execution_error(self, prompt_id, prompt, current_outputs, executed, error, ex):
        result = original(self, prompt_id, prompt, current_outputs, executed, error, ex)
        if isinstance(ex, ConsentGuardRefusal):
            try:
                node_id = (error or {}).get("node_id")
                node = (prompt or {}).get(node_id) or {}
                log.warning("Consent Guard: run stopped at node %s (%s): %s", node_id,
                            node.get("class_type", "?"), ex.kind)
                self.add_message(REFUSAL_EVENT, ex.payload(
                    comfy_bridge.ui_locale(), prompt_id=prompt_id,
                    node=None if node_id is None else str(node_id),
                    node_type=node.get("class_type"), stopped=True, detail=str(ex)),
                    broadcast=False)
            except Exception as exc:  # the run is stopped either way; only the notice is lost
                log.error("Consent Guard: could not report a refusal: %s", exc)
        return result
    handle_execution_error.consent_guard_hook = True
    return handle_execution_error


def install_refusal_shape(execution) -> None:
    """Wrap execution.validate_prompt so that a prompt refused by prompt_guard.on_prompt gets
    prompt_guard.refusal_response (any other prompt goes on to whatever was there)."""
    from . import prompt_guard

    current = execution.validate_prompt
    if getattr(current, "consent_guard_refusal_shape", False):
        return

    @functools.wraps(current)
    async def validate_prompt(prompt_id, prompt, *args, **kwargs):
        refused = prompt_guard.refusal_response(prompt)
        if refused is not None:
            return refused
        return await current(prompt_id, prompt, *args, **kwargs)
    validate_prompt.consent_guard_refusal_shape = True
    validate_prompt.consent_guard_hook = getattr(current, "consent_guard_hook", False)
    execution.validate_prompt = validate_prompt


def install_shown() -> Dict[str, str]:
    """Install the hooks that show refusals (idempotent; failures are logged, and change
    nothing about what is refused)."""
    def executor():
        import execution
        _patch_into(execution.PromptExecutor, "handle_execution_error",
                    _wrap_handle_execution_error)

    def shape():
        import execution
        install_refusal_shape(execution)

    for name, fn in (("execution.PromptExecutor.handle_execution_error", executor),
                     ("execution.validate_prompt (refusal shape)", shape)):
        try:
            fn()
            SHOWN[name] = "installed"
        except Exception as exc:
            SHOWN[name] = f"not installed: {type(exc).__name__}: {exc}"
            log.error("Consent Guard: %s not installed (refusals will be shown less clearly): "
                      "%s", name, exc)
    return dict(SHOWN)


def _patch_into(owner, attr: str, wrap) -> None:
    current = getattr(owner, attr)
    if not getattr(current, "consent_guard_hook", False):
        setattr(owner, attr, wrap(current))


def status() -> dict:
    """For GET /consent_guard/status and `consent-guard doctor --url`."""
    st = state()
    try:
        on = enforce_on()
    except Exception:
        on = True
    return {"enforce": on, "armed": bool(st.armed), "problem": st.problem,
            "prestartup_guard": bool(getattr(st, "guarded", False)), "hooks": dict(HOOKS),
            "refusal_display": dict(SHOWN), "previews": "off" if on else "on"}

