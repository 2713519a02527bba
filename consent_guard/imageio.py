"""Turning files and arrays into the one form the detectors take: RGB uint8, H x W x 3.

Every odd input gets a clear ImageInputError instead of a crash: corrupt or truncated files,
decompression bombs, grayscale, alpha, 16-bit, float, NaN, empty or oddly shaped arrays.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageOps, ImageSequence

MAX_FRAMES = 1000  # an animation longer than this is refused rather than half-checked


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
        if not np.isfinite(a).all():
            raise ImageInputError("image contains NaN or infinite values")
        out = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
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


def read_image_frames(path: Path, max_pixels: int, draft_size: int = 0
                      ) -> Tuple[List[np.ndarray], Tuple[int, int]]:
    """Decode a file into RGB uint8 frames (one for a still image, each frame of an animation)
    and the image's size as displayed (width, height).

    With `draft_size`, a large JPEG is decoded at a reduced scale (JPEG's own DCT scaling, far
    cheaper than decoding in full and resizing) no smaller than draft_size on either side; the
    returned size is still the full one, so boxes can be mapped back to it.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except FileNotFoundError:
        raise ImageInputError("file not found") from None
    except IsADirectoryError:
        raise ImageInputError("is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageInputError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise ImageInputError(f"too large to check: {w}x{h} = {w * h / 1e6:.0f} MP, over the "
                                  f"policy limit of {max_pixels / 1e6:.0f} MP ([limits] max_pixels)")
        n_frames = getattr(img, "n_frames", 1)
        if n_frames > MAX_FRAMES:
            raise ImageInputError(f"has {n_frames} frames, over the limit of {MAX_FRAMES}")
        frames = []
        try:
            orientation = img.getexif().get(0x0112, 1) if n_frames == 1 else 1
            if orientation in (5, 6, 7, 8):
                w, h = h, w
            if draft_size and img.format == "JPEG" and min(img.size) > 2 * draft_size:
                img.draft("RGB", (draft_size, draft_size))
            for frame in ImageSequence.Iterator(img):
                frame.load()
                if n_frames == 1:
                    frame = ImageOps.exif_transpose(frame)
                frames.append(_frame_to_rgb(frame))
        except ImageInputError:
            raise
        except Exception as exc:
            raise ImageInputError(f"is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    if not frames:
        raise ImageInputError("holds no image frames")
    return frames, (w, h)
