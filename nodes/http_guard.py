"""Enforce mode over HTTP: what ComfyUI's own routes let anyone write and read back.

Followed in ComfyUI a125cd84 (0.3.64), server.py:
* `upload_image` (POST /upload/image) and `upload_mask` (POST /upload/mask) both read
  `await request.post()` and call `image_upload(post, save)`: the file goes into
  `get_dir_by_type(post["type"])`, so type=output|temp writes straight into the folders that
  enforce mode otherwise fills only with checked images. upload_mask's `image_save_function`
  opens the original named by the JSON field `original_ref` (folder_paths.annotated_filepath,
  then get_directory_by_type(original_ref["type"]), then original_ref["subfolder"]),
  converts it to RGBA, puts the uploaded mask's alpha into it and writes that.
* `view_image` (GET /view) serves `<get_directory_by_type(type)>/<subfolder>/<basename>` (or
  the folder named by a " [output]"-style suffix): the file as it is, a re-encoded preview,
  its RGB, or its alpha channel as a picture (channel=a).
* `add_routes()` adds every route of `PromptServer.routes` twice, as /path and /api/path, and
  app/user_manager.py adds GET and POST /userdata/{file} (any bytes, inside user/<user>/).
  `self.app = web.Application(middlewares=[...])` is built in PromptServer.__init__; main.py
  imports custom nodes (nodes.init_extra_nodes) after that and starts the app (which freezes
  its middlewares) only later, so a middleware appended while this package is imported runs
  for every route, both prefixes and sub-apps (/internal) included.

In enforce mode (enforce.enforce_on(), asked on every request) the middleware here:
* uploads: refuses type other than input; reads the uploaded file as an image (every frame,
  and any alpha channel that is not flat, as a grayscale picture, since LoadImage turns it into
  a MASK and /view?channel=a shows it) and checks it as an input (check_input_images: a
  photo of someone protected under scope `any` is refused). For /upload/mask it builds the
  picture upload_mask would write (the original's RGB with the mask's alpha) and checks that.
  Anything that is not an image it can check (video, audio, 3D, unreadable) is refused: the
  file would be served back unchecked through /view.
* /view: serves a file only after it passed the output check (check_images: explicit content,
  minors, protected people), whatever put the file there; the verdict is cached in memory by
  (real path, device, inode, size, mtime_ns, policy and registry state), so a file is checked
  once until it or the checks change. Audio (.wav .flac .mp3 .ogg .opus whose first bytes say
  so, with no embedded picture) is served unchecked; videos, 3D files and everything else are
  refused, since their pictures cannot be checked here. A /view that answers 200 although no
  file was checked is refused too (fail closed).
* /userdata/{file}: a POST whose body is an image or a video is refused; a GET that would
  serve an image is checked like /view.
Refusals answer 403 (400 for an upload that cannot be read as asked) with {"error": message}
and the message as the HTTP reason (the front end's upload shows only "status - statusText"). A refusal never says who was recognised; the
audit log has each verdict for the admin. Checks run on one worker thread, off the event loop.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from ..consent_guard import imageio
from ..consent_guard.imageio import MAX_FRAMES, ImageInputError
from . import comfy_bridge, enforce, image_nodes

log = logging.getLogger("consent_guard")

HOOK_NAME = "PromptServer.app middleware (uploads, /view)"  # its key in enforce.HOOKS
# (method, route as registered, without the /api prefix) -> what guards it
ROUTES = {("POST", "/upload/image"): "upload", ("POST", "/upload/mask"): "mask",
          ("GET", "/view"): "view", ("HEAD", "/view"): "view",
          ("GET", "/userdata/{file}"): "userdata_get", ("HEAD", "/userdata/{file}"): "userdata_get",
          ("POST", "/userdata/{file}"): "userdata_post"}
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus"}  # comfy_extras/nodes_audio.py
AUDIO_HEAD = 1024 * 1024  # embedded cover art sits in the first metadata blocks
PICTURE_MARKERS = (b"APIC", b"JFIF", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0",
                   b"\xff\xd8\xff\xe1")  # ID3 cover art, JPEG and PNG streams
VORBIS_PICTURE = b"metadata_block_picture"  # a Vorbis comment name: any case
CACHE_SIZE = 4096
REFUSED = ("Consent Guard (enforce mode) refused this image: it did not pass the check. "
           "The admin can see why in the audit log.")

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="consent-guard-http")


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str


class NotAnImage(ValueError):
    """The file is no image format Pillow knows (video, audio, text, ...)."""


# -- installing -----------------------------------------------------------------------------------

def install(server_instance) -> None:
    """Append the middleware to `server_instance.app` (server.PromptServer); idempotent.
    Raises RuntimeError saying why when it cannot, so that enforce mode does not arm."""
    app = getattr(server_instance, "app", None)
    middlewares = getattr(app, "middlewares", None)
    if middlewares is None:
        raise RuntimeError("Consent Guard cannot guard uploads and /view: the ComfyUI server "
                           "has no aiohttp application (PromptServer.app) to add a middleware to")
    if any(getattr(m, "consent_guard_hook", False) for m in middlewares):
        return
    if getattr(app, "frozen", False) or getattr(middlewares, "frozen", False):
        raise RuntimeError("Consent Guard cannot guard uploads and /view: the ComfyUI server "
                           "has already started, and aiohttp takes no middleware after that "
                           "(load Consent Guard as a custom node, which ComfyUI imports first)")
    middlewares.append(guard)


async def guard(request, handler):
    """The aiohttp middleware (new style, as @web.middleware marks it)."""
    kind = ROUTES.get((request.method, route_of(request)))
    if kind is None:
        return await handler(request)
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, enforce.enforce_on_safely):
        return await handler(request)
    if kind in ("upload", "mask"):
        refusal = await guard_upload(request, mask=kind == "mask")
    elif kind == "userdata_post":
        refusal = await guard_userdata_post(request)
    else:
        return await guard_served(request, handler, kind)
    if refusal is not None:
        return respond(refusal, request)
    return await handler(request)


guard.__middleware_version__ = 1  # what aiohttp.web.middleware sets
guard.consent_guard_hook = True


def route_of(request) -> str:
    """The route the request matched (e.g. /view or /userdata/{file}), /api prefix removed:
    the matched route, not the raw URL, so no spelling of the URL can slip past."""
    try:
        path = request.match_info.route.resource.canonical
    except AttributeError:  # no route matched (404, 405): the handler answers that itself
        path = None
    if not path:
        path = request.path
    return path[4:] if path.startswith("/api/") else path


def respond(refusal: Refusal, request=None):
    from aiohttp import web  # ComfyUI's own dependency; only needed inside ComfyUI

    where = f"{request.method} {request.path}" if request is not None else "request"
    log.warning("Consent Guard (enforce): %s refused: %s", where, refusal.message)
    reason = refusal.message.encode("ascii", "replace").decode().replace("\n", " ")[:200]
    return web.json_response({"error": refusal.message, "consent_guard": True},
                             status=refusal.status, reason=reason,
                             headers={"Cache-Control": "no-store"})


async def in_worker(fn, *args):
    """Run a blocking check on the one worker thread: never on the event loop, and never more
    than one at a time, so a flood of requests queues instead of starving the server."""
    return await asyncio.get_running_loop().run_in_executor(_executor, fn, *args)


async def check_in_worker(fn, *args) -> Optional[Refusal]:
    """in_worker for a check that returns a Refusal or None: whatever it raises (a policy or
    registry that cannot be opened, a file that vanished) refuses, never lets through."""
    try:
        return await in_worker(fn, *args)
    except Exception as exc:
        log.exception("Consent Guard: an HTTP check raised")
        return Refusal(403, f"Consent Guard (enforce mode) could not check this, so it is "
                            f"refused: {exc}")


# -- uploads --------------------------------------------------------------------------------------

async def guard_upload(request, mask: bool) -> Optional[Refusal]:
    """POST /upload/image and /upload/mask. aiohttp keeps the parsed form on the request, so
    the handler's own `await request.post()` gets the same fields and files afterwards."""
    post = await request.post()
    kind = post.get("type")
    if kind not in (None, "", "input"):
        return Refusal(403, f"Consent Guard (enforce mode) accepts uploads only into the input "
                            f"folder, not '{kind}': the output and temp folders hold only "
                            f"images it has checked.")
    upload = post.get("image")
    if upload is None or not hasattr(upload, "file"):
        return Refusal(400, "Consent Guard (enforce mode): the upload has no file in the "
                            "'image' field.")
    name = getattr(upload, "filename", None) or "upload"
    check = check_mask_upload if mask else check_image_upload
    try:
        return await check_in_worker(check, upload.file, name, post.get("original_ref"))
    finally:
        upload.file.seek(0)  # the handler reads the file from its start


def check_image_upload(fp, name: str, _original_ref=None) -> Optional[Refusal]:
    """Blocking: the uploaded file, every frame and any alpha, checked as an input."""
    try:
        frames, alphas = read_frames(io.BytesIO(fp.read()), "the upload")
    except NotAnImage:
        return Refusal(403, f"Consent Guard (enforce mode) accepts only image uploads it can "
                            f"check; {name} is not an image (videos, audio and other files can "
                            f"be put into the input folder by the admin).")
    except ImageInputError as exc:
        return Refusal(400, f"Consent Guard (enforce mode) cannot check {name}, so it is "
                            f"refused: {exc}")
    return judge(frames + alphas, inputs=True, where=f"POST /upload/image {name}")


def check_mask_upload(fp, name: str, original_ref) -> Optional[Refusal]:
    """Blocking: the picture upload_mask would write (the original's RGB with the mask's
    alpha), its RGB and its alpha (the mask, as grayscale) checked as inputs."""
    try:
        original = mask_original(original_ref)
    except ValueError as exc:
        return Refusal(400, f"Consent Guard (enforce mode) refuses this mask upload: {exc}")
    try:
        composite = mask_composite(original, io.BytesIO(fp.read()))
        frames, alphas = split_frame(composite)
    except NotAnImage:
        return Refusal(403, f"Consent Guard (enforce mode): the mask {name} is not an image.")
    except ImageInputError as exc:
        return Refusal(400, f"Consent Guard (enforce mode) cannot check the mask {name}, so "
                            f"it is refused: {exc}")
    return judge(frames + alphas, inputs=True, where=f"POST /upload/mask {name}")


def mask_original(original_ref) -> Path:
    """The original upload_mask's image_save_function opens, found the same way."""
    import folder_paths

    try:
        ref = json.loads(original_ref)
        filename, folder = folder_paths.annotated_filepath(ref["filename"])
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"its original_ref is not the JSON the mask editor sends ({exc})")
    if not filename or filename[0] == "/" or ".." in filename:
        raise ValueError("its original_ref names no usable file")
    if folder is None:
        folder = folder_paths.get_directory_by_type(ref.get("type", "output"))
    if folder is None:
        raise ValueError("its original_ref names an unknown folder type")
    if ref.get("subfolder", "") != "":
        full = os.path.join(folder, ref["subfolder"])
        if os.path.commonpath((os.path.abspath(full), folder)) != folder:
            raise ValueError("its original_ref's subfolder leaves the folder")
        folder = full
    path = Path(folder) / filename
    if not path.is_file():
        raise ValueError(f"the original image {filename} was not found")
    return path


def mask_composite(original: Path, mask_fp) -> Image.Image:
    """As upload_mask: original.convert('RGBA') with putalpha(mask.convert('RGBA') alpha)."""
    with open_image(original, "the original") as orig, open_image(mask_fp, "the mask") as mask:
        out = orig.convert("RGBA")
        alpha = mask.convert("RGBA").getchannel("A")
    if alpha.size != out.size:
        raise ImageInputError(f"the mask is {alpha.size[0]}x{alpha.size[1]} and the image "
                              f"{out.size[0]}x{out.size[1]}")
    out.putalpha(alpha)
    return out


# -- reading images -------------------------------------------------------------------------------

def open_image(source, what: str) -> Image.Image:
    """Pillow's Image.open with decompression bombs refused and the policy's size limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
    except UnidentifiedImageError as exc:
        raise NotAnImage(str(exc)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"{what} is refused as a decompression bomb: {exc}") from None
    except Exception as exc:
        raise ImageInputError(f"{what} is not a readable image ({type(exc).__name__}: "
                              f"{exc})") from None
    try:
        limit = image_nodes.get_engine().policy.max_pixels
        w, h = img.size
        frames = int(getattr(img, "n_frames", 1))  # Pillow walks frame headers, decodes none
    except Exception as exc:
        img.close()
        raise ImageInputError(f"{what} cannot be checked ({type(exc).__name__}: {exc})") \
            from None
    if w * h * frames > limit or frames > MAX_FRAMES:
        img.close()
        raise ImageInputError(f"{what} is too large to check: {frames} frame(s) of {w}x{h}, "
                              f"over the policy limit of {limit} pixels in all "
                              f"([limits] max_pixels) or {MAX_FRAMES} frames")
    return img


def read_frames(source, what: str) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Every frame as RGB, and every alpha channel that is not flat as a grayscale picture.
    All frames together are bounded by the policy's max_pixels (a long animation is refused
    rather than decoded into gigabytes)."""
    frames: List[np.ndarray] = []
    alphas: List[np.ndarray] = []
    with open_image(source, what) as img:
        single = getattr(img, "n_frames", 1) == 1
        try:
            for frame in ImageSequence.Iterator(img):
                frame.load()
                if single:
                    frame = ImageOps.exif_transpose(frame)
                rgb, alpha = split_frame(frame)
                frames += rgb
                alphas += alpha
        except ImageInputError:
            raise
        except Exception as exc:
            raise ImageInputError(f"{what} is corrupt or truncated ({type(exc).__name__}: "
                                  f"{exc})") from None
    if not frames:
        raise ImageInputError(f"{what} holds no image frames")
    return frames, alphas


def split_frame(frame: Image.Image) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """([RGB], [alpha] or []): the alpha only when it holds a picture (not one flat value)."""
    rgb = imageio._frame_to_rgb(frame)  # the engine's own conversion (16-bit, float, palette)
    has_alpha = bool({"A", "a"} & set(frame.getbands())) or "transparency" in frame.info
    if not has_alpha:
        return [rgb], []
    alpha = np.asarray(frame.convert("RGBA").getchannel("A"))
    return [rgb], ([alpha] if alpha.min() != alpha.max() else [])


def judge(pictures: List[np.ndarray], inputs: bool, where: str) -> Optional[Refusal]:
    """Check the pictures (each verdict audited); None when all are allowed. A check that
    cannot run, or an audit log that cannot be written, refuses."""
    try:
        engine = image_nodes.get_engine()
        verdicts = image_nodes.check_frames(engine, pictures, inputs=inputs, where=where)
    except Exception as exc:  # ConsentGuardError (policy, registry, audit) or anything else
        return Refusal(403, f"Consent Guard (enforce mode) could not check this image, so it "
                            f"is refused: {exc}")
    failed = [v for v in verdicts if v.error]
    if failed:
        return Refusal(403, f"Consent Guard (enforce mode) could not check this image, so it "
                            f"is refused: {failed[0].error}")
    if not all(v.allowed for v in verdicts):
        return Refusal(403, REFUSED)
    return None


# -- serving files --------------------------------------------------------------------------------

async def guard_served(request, handler, kind: str):
    """GET /view and GET /userdata/{file}: check the file before it is served."""
    checked = None
    if kind == "view":
        checked = view_file(request.rel_url.query)
        if checked is not None:
            refusal = await check_in_worker(file_refusal, checked)
            if refusal is not None:
                return respond(refusal, request)
    response = await handler(request)
    try:
        served = served_path(response)
    except LookupError as exc:
        return respond(Refusal(403, f"Consent Guard (enforce mode) cannot check what it "
                                    f"would serve, so it is refused: {exc}"), request)
    if kind == "userdata_get" and served is not None:
        refusal = await check_in_worker(userdata_refusal, served)
        return respond(refusal, request) if refusal is not None else response
    if kind == "view" and getattr(response, "status", 0) == 200 and (
            checked is None or (served is not None and not same_file(served, checked))):
        return respond(Refusal(403, "Consent Guard (enforce mode) could not tell which file "
                                    "/view served, so it is refused."), request)
    return response


def view_file(query) -> Optional[Path]:
    """The file server.py view_image serves for this query, found as it finds it; None when
    it serves none (it then answers 400/403/404 by itself)."""
    import folder_paths

    if "filename" not in query:
        return None
    filename, folder = folder_paths.annotated_filepath(query["filename"])
    if not filename or filename[0] == "/" or ".." in filename:
        return None
    if folder is None:
        folder = folder_paths.get_directory_by_type(query.get("type", "output"))
    if folder is None:
        return None
    if "subfolder" in query:
        full = os.path.join(folder, query["subfolder"])
        try:
            if os.path.commonpath((os.path.abspath(full), folder)) != folder:
                return None
        except ValueError:
            return None
        folder = full
    path = Path(folder) / os.path.basename(filename)
    return path if path.is_file() else None


def served_path(response) -> Optional[Path]:
    """The file an aiohttp FileResponse will send (its `_path`, aiohttp 3.x), else None.
    Raises LookupError for a FileResponse that does not say (another aiohttp version)."""
    path = getattr(response, "_path", None)
    if path is None and type(response).__name__ == "FileResponse":
        raise LookupError("this aiohttp's FileResponse does not say which file it sends")
    return Path(path) if path is not None else None


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class VerdictCache:
    """(real path, device, inode, size, mtime_ns, checks state) -> refusal or None. In memory
    only: after a restart each file is checked again on its first view."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._items:
                return False, None
            self._items.move_to_end(key)
            return True, self._items[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


CACHE = VerdictCache()


def file_key(path: Path):
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_refusal(path: Path) -> Optional[Refusal]:
    """Blocking: None when the file may be served; its verdict cached until it or the policy
    or registry changes. A file that changes while it is checked is refused this time."""
    try:
        key = file_key(path) + (comfy_bridge.checks_state(), id(image_nodes.get_engine()))
    except Exception as exc:
        return Refusal(403, f"Consent Guard (enforce mode) could not check {path.name}, so it "
                            f"is not served: {exc}")
    hit, refusal = CACHE.get(key)
    if hit:
        return refusal
    refusal = judge_file(path)
    try:
        unchanged = file_key(path) == key[:5]
    except OSError:
        unchanged = False
    if not unchanged:
        return Refusal(403, f"Consent Guard (enforce mode): {path.name} changed while it was "
                            f"checked, so it is not served; ask again.")
    CACHE.put(key, refusal)
    return refusal


def remember_written(path: Path, since: float) -> bool:
    """A file a saver just wrote from pictures the gate let through (enforce.py): /view serves
    it without checking it again, until it, the policy or the registry changes. Only a file
    written since `since`; False when it cannot be remembered (then /view checks it)."""
    try:
        if os.stat(path).st_mtime < since:
            return False
        key = file_key(path) + (comfy_bridge.checks_state(), id(image_nodes.get_engine()))
    except Exception:
        return False
    CACHE.put(key, None)
    return True


def judge_file(path: Path) -> Optional[Refusal]:
    """The output check of every frame and alpha of an image file; audio passes; anything
    else is refused, since what it may show cannot be checked here."""
    try:
        frames, alphas = read_frames(path, path.name)
    except NotAnImage:
        if is_plain_audio(path):
            return None
        return Refusal(403, f"Consent Guard (enforce mode) serves only images it has checked "
                            f"and plain audio; {path.name} is {kind_of(path)} it cannot check.")
    except ImageInputError as exc:
        return Refusal(403, f"Consent Guard (enforce mode) cannot check {path.name}, so it is "
                            f"not served: {exc}")
    return judge(frames + alphas, inputs=False, where=f"GET /view {path.name}")


def kind_of(path: Path) -> str:
    if path.suffix.lower() in enforce.VIDEO_SUFFIXES:
        return "a video, whose frames"
    return "a file whose content"


def is_plain_audio(path: Path) -> bool:
    """An audio file (by name and by its first bytes) with no embedded picture (ID3 APIC,
    FLAC/Vorbis picture blocks, or a PNG/JPEG stream inside)."""
    if path.suffix.lower() not in AUDIO_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(AUDIO_HEAD)
    except OSError:
        return False
    audio = (head[:4] == b"RIFF" and head[8:12] == b"WAVE") or head[:4] == b"fLaC" \
        or head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0) \
        or (head[:4] == b"OggS" and any(m in head[:200] for m in
                                        (b"OpusHead", b"\x01vorbis", b"\x7fFLAC")))
    if not audio:
        return False
    return not any(m in head for m in PICTURE_MARKERS) and VORBIS_PICTURE not in head.lower() \
        and not flac_picture(head)


def flac_picture(head: bytes) -> bool:
    """Whether a FLAC stream's metadata blocks (in `head`) hold a PICTURE block (type 6)."""
    if head[:4] != b"fLaC":
        return False
    at = 4
    while at + 4 <= len(head):
        block, size = head[at] & 0x7F, int.from_bytes(head[at + 1:at + 4], "big")
        if block == 6:
            return True
        if head[at] & 0x80:  # the last metadata block
            return False
        at += 4 + size
    return True  # metadata longer than we read: it may hold one


# Files a browser renders with pictures in them that Pillow cannot open (an SVG or a page
# can carry a photo as a data: URL): refused in the user folder, by name or by content.
MARKUP_SUFFIXES = {".svg", ".svgz", ".html", ".htm", ".xhtml", ".xml", ".mht", ".mhtml"}
MARKUP_HEADS = (b"<svg", b"<?xml", b"<!doctype html", b"<html")


def is_markup(name: str, head: bytes) -> bool:
    """An SVG, HTML or XML file: by its name, or by its first bytes (after blanks)."""
    return Path(name).suffix.lower() in MARKUP_SUFFIXES or \
        head[:1024].lstrip().lower().startswith(MARKUP_HEADS)


def userdata_refusal(path: Path) -> Optional[Refusal]:
    """GET /userdata/{file}: an image is checked like /view, a video or markup (SVG, HTML)
    refused, other files (workflows, settings) pass."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(1024)
    except OSError as exc:
        return Refusal(403, f"Consent Guard (enforce mode) cannot read {path.name}: {exc}")
    if is_markup(path.name, head):
        return Refusal(403, f"Consent Guard (enforce mode) does not serve SVG or HTML files "
                            f"from the user folder ({path.name}): they can carry pictures it "
                            f"cannot check.")
    try:
        with open_image(path, path.name):
            pass
    except NotAnImage:
        if path.suffix.lower() in enforce.VIDEO_SUFFIXES:
            return Refusal(403, f"Consent Guard (enforce mode) does not serve videos from the "
                                f"user folder ({path.name}).")
        return None
    except ImageInputError as exc:
        return Refusal(403, f"Consent Guard (enforce mode) cannot check {path.name}, so it is "
                            f"not served: {exc}")
    return file_refusal(path)


async def guard_userdata_post(request) -> Optional[Refusal]:
    """POST /userdata/{file}: the user folder keeps workflows and settings; an image or video
    stored there could be served back unchecked, so in enforce mode none is accepted.
    (request.read() keeps the body for the handler's own read.)"""
    name = request.match_info.get("file", "") if hasattr(request, "match_info") else ""
    body = await request.read()
    if await in_worker(is_picture, body) or Path(name).suffix.lower() in enforce.VIDEO_SUFFIXES \
            or is_markup(name, body[:1024]):
        return Refusal(403, "Consent Guard (enforce mode) does not accept images, videos, SVG "
                            "or HTML into the user folder; upload images to the input folder "
                            "instead.")
    return None


def is_picture(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except UnidentifiedImageError:
        return False
    except Exception:  # Pillow knows the format but cannot read it: refuse as a picture
        return True


__all__ = ["install", "guard", "Refusal", "CACHE", "ROUTES", "HOOK_NAME"]
