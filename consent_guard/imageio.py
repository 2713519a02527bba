"""Turning files and arrays into the one form the detectors take: RGB uint8, H x W x 3.

Every odd input gets a clear ImageInputError instead of a crash: corrupt or truncated files,
decompression bombs, grayscale, alpha, 16-bit, float, NaN, empty or oddly shaped arrays.

A file is budgeted as a whole: the policy's [limits] max_pixels bounds the pixels of all its
frames together, and MAX_FRAMES their number, both checked from the header before anything
is decoded. A small GIF of a thousand large frames would otherwise decode to gigabytes. Past
the budget the file is an error (a block verdict), never a partly checked "allow".
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np
from PIL import Image, ImageOps, ImageSequence

# An animation longer than this is refused rather than half-checked (every frame is checked,
# and checking costs time per frame); its frames together must also fit [limits] max_pixels.
MAX_FRAMES = 300


class ImageInputError(ValueError):
    """An image that cannot be checked; the message says what is wrong with it."""


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Normalise an array (H,W), (H,W,1|2|3|4), uint8/uint16/float in 0..1) to RGB uint8.

    Alpha is dropped, not composited: pixels under a transparent alpha are still in the file
    and can be recovered, so they are checked as they are.
    """
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ImageInputError(f"expected an image of shape (H, W) or (H, W, C), got {a.shape}")
    h, w, c = a.shape
    if h == 0 or w == 0:
        raise ImageInputError(f"image is empty ({w}x{h})")
    if c not in (1, 2, 3, 4):
        raise ImageInputError(f"image has {c} channels; expected 1 (gray), 2 (gray+alpha), "
                              f"3 (RGB) or 4 (RGBA)")
    if a.dtype == np.uint8:
        out = a
    elif a.dtype == np.uint16:
        out = (a >> 8).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        out = float01_to_uint8(a)
    elif a.dtype == np.bool_:
        out = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.integer):
        out = np.clip(a, 0, 255).astype(np.uint8)
    else:
        raise ImageInputError(f"unsupported pixel type {a.dtype}")
    if c in (1, 2):
        out = np.repeat(out[:, :, :1], 3, axis=2)
    elif c == 4:
        out = out[:, :, :3]
    return np.ascontiguousarray(out)


CHUNK_BYTES = 1 << 18  # rows converted at a time: their temporaries stay in the CPU cache


def float01_to_uint8(a: np.ndarray) -> np.ndarray:
    """(clip(a, 0, 1) * 255 + 0.5) as uint8, bit for bit, a band of rows at a time.

    The whole-array expression makes four temporaries the size of the image (a 2048 px float
    frame: 50 MB each) and walks memory five times; in bands of about CHUNK_BYTES the same
    arithmetic, in the same dtype, runs in cache (bench/speed.py prints the ratio). A NaN or
    infinity anywhere is an ImageInputError, as before."""
    out = np.empty(a.shape, np.uint8)
    if not a.size:
        return out
    row_bytes = max(1, a[:1].nbytes)
    rows = max(1, CHUNK_BYTES // row_bytes)
    scratch = np.empty((rows,) + a.shape[1:], a.dtype)
    for start in range(0, a.shape[0], rows):
        band = a[start:start + rows]
        buf = scratch[:len(band)]
        if not np.isfinite(band).all():
            raise ImageInputError("image contains NaN or infinite values")
        np.clip(band, 0.0, 1.0, out=buf)
        np.multiply(buf, 255.0, out=buf)
        np.add(buf, 0.5, out=buf)
        out[start:start + len(band)] = buf  # truncates toward zero, as astype(np.uint8)
    return out


def uint8_to_float01(frames) -> np.ndarray:
    """A batch of uint8 frames (same shape) as one float32 array in 0..1: frame / 255, the
    ComfyUI IMAGE layout. Written frame by frame into one array, so no uint8 stack and no
    float temporary the size of the batch are made."""
    first = np.asarray(frames[0])
    out = np.empty((len(frames),) + first.shape, np.float32)
    for i, frame in enumerate(frames):
        np.divide(np.asarray(frame), np.float32(255.0), out=out[i], dtype=np.float32)
    return out


def _frame_to_rgb(frame: Image.Image) -> np.ndarray:
    if frame.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(frame, dtype=np.int64)
        peak = 65535 if frame.mode.startswith("I;16") or a.max(initial=0) > 255 else 255
        return to_rgb_uint8((np.clip(a, 0, peak) * (255.0 / peak)).astype(np.uint8))
    if frame.mode == "F":
        a = np.asarray(frame, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ImageInputError("image contains NaN or infinite values")
        top = float(a.max(initial=1.0))
        return to_rgb_uint8(a / (top if top > 1.0 else 1.0))
    if frame.mode not in ("RGB", "L"):
        frame = frame.convert("RGBA" if "A" in frame.mode or frame.mode == "P" else "RGB")
    return to_rgb_uint8(np.asarray(frame))


def _open(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except FileNotFoundError:
        raise ImageInputError("file not found") from None
    except IsADirectoryError:
        raise ImageInputError("is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageInputError(f"not a readable image ({type(exc).__name__}: {exc})") from None


def _frame_count(img: Image.Image) -> int:
    """How many frames the file says it holds. Pillow finds a GIF's count by walking the frame
    headers without decoding pixels; a file so broken that even that fails is refused."""
    try:
        return int(getattr(img, "n_frames", 1))
    except Exception as exc:
        raise ImageInputError(f"is corrupt or truncated ({type(exc).__name__}: {exc})") from None


def _check_budget(img: Image.Image, max_pixels: int) -> int:
    """Refuse, before anything is decoded, a file whose frames together hold more pixels than
    `max_pixels` or more frames than MAX_FRAMES; returns the frame count. Every frame of an
    animation is decoded at the full canvas size, so a small file of many large frames is a
    decompression bomb in time and memory even when each frame alone is within the limit."""
    w, h = img.size
    if w * h > max_pixels:
        raise ImageInputError(f"too large to check: {w}x{h} = {w * h / 1e6:.0f} MP, over the "
                              f"policy limit of {max_pixels / 1e6:.0f} MP ([limits] max_pixels)")
    n_frames = _frame_count(img)
    if n_frames > MAX_FRAMES:
        raise ImageInputError(f"has {n_frames} frames, over the limit of {MAX_FRAMES}: an "
                              f"animation this long is refused rather than half-checked")
    if n_frames * w * h > max_pixels:
        raise ImageInputError(f"too large to check: {n_frames} frames of {w}x{h} = "
                              f"{n_frames * w * h / 1e6:.0f} MP in all, over the policy limit of "
                              f"{max_pixels / 1e6:.0f} MP per file ([limits] max_pixels)")
    return n_frames


def iter_image_frames(path: Path, max_pixels: int, draft_size: int = 0
                      ) -> Iterator[Tuple[np.ndarray, Tuple[int, int]]]:
    """Decode a file one frame at a time: yields (RGB uint8 frame, (width, height) as
    displayed), so a caller that checks frame by frame holds one frame in memory, not the whole
    animation. The file is refused (ImageInputError) before any frame is decoded when its
    frames together exceed `max_pixels` or MAX_FRAMES; pages of a multi-page file that turn out
    larger than the first are counted as they come, and the budget still holds.

    With `draft_size`, a large JPEG is decoded at a reduced scale (JPEG's own DCT scaling, far
    cheaper than decoding in full and resizing) no smaller than draft_size on either side; the
    size yielded is still the full one, so boxes can be mapped back to it.
    """
    img = _open(Path(path))
    with img:
        n_frames = _check_budget(img, max_pixels)
        w, h = img.size
        spent, count = 0, 0
        try:
            orientation = img.getexif().get(0x0112, 1) if n_frames == 1 else 1
            if orientation in (5, 6, 7, 8):
                w, h = h, w
            if draft_size and img.format == "JPEG" and min(img.size) > 2 * draft_size:
                img.draft("RGB", (draft_size, draft_size))
            for frame in ImageSequence.Iterator(img):
                spent += frame.size[0] * frame.size[1]
                count += 1
                if spent > max_pixels or count > MAX_FRAMES:
                    raise ImageInputError(f"too large to check: its frames hold over "
                                          f"{max_pixels / 1e6:.0f} MP in all (policy limit per "
                                          f"file, [limits] max_pixels)")
                frame.load()
                if n_frames == 1 and orientation != 1:
                    # in place: without it Pillow copies the whole frame even when there is
                    # nothing to turn (the frame is this function's own, closed below)
                    ImageOps.exif_transpose(frame, in_place=True)
                yield _frame_to_rgb(frame), (w, h)
        except ImageInputError:
            raise
        except Exception as exc:
            raise ImageInputError(f"is corrupt or truncated ({type(exc).__name__}: "
                                  f"{exc})") from None
    if not count:
        raise ImageInputError("holds no image frames")


def read_image_frames(path: Path, max_pixels: int, draft_size: int = 0
                      ) -> Tuple[List[np.ndarray], Tuple[int, int]]:
    """Every frame of a file (one for a still image) and its size as displayed (width, height),
    within the same per-file budget as iter_image_frames: at most `max_pixels` decoded pixels in
    all, so what is kept in memory is bounded by the policy's limit whatever the file holds."""
    frames, size = [], (0, 0)
    for frame, size in iter_image_frames(path, max_pixels, draft_size):
        frames.append(frame)
    return frames, size
