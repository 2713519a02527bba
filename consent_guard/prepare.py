"""Decode once, resize once, and share the result between the models.

A PreparedImage keeps one working copy, cut down once from the decoded pixels, from which each
model's input (and any region crop) is made. Censoring works on the caller's full pixels.
"""
from __future__ import annotations

import io
from functools import cached_property
from typing import Optional, Tuple

import numpy as np
from PIL import Image

WORK_SIZE = 320  # the working copy's long side is between this and twice this (NudeNet sees 320)
NUDENET_SIZE = 320
OPENNSFW_RESIZE, OPENNSFW_CROP = 256, 224
OPENNSFW_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)


class PreparedImage:
    """One image as the models see it. `size` is the image's full size (width, height): boxes
    are reported in it. The pixels kept are a working copy no larger than about twice WORK_SIZE
    on the long side, cut down once from what was decoded, and shared by both models."""

    def __init__(self, rgb: np.ndarray, size: Optional[Tuple[int, int]] = None):
        h, w = rgb.shape[:2]
        self.size = size or (w, h)
        img = Image.fromarray(rgb)
        factor = max(w, h) // WORK_SIZE
        if factor >= 2:
            img = img.reduce(factor)  # a fast box filter, integer factor
        self.work = img
        self.to_full = self.size[0] / img.size[0]  # work-copy pixels -> full-size pixels

    @cached_property
    def nudenet_input(self) -> np.ndarray:
        """3 x 320 x 320 float32, RGB/255; the image top-left in a black square, as NudeNet
        pads bottom/right before resizing."""
        w, h = self.work.size
        side = max(w, h)
        small = self.work.resize((max(1, round(w * NUDENET_SIZE / side)),
                                  max(1, round(h * NUDENET_SIZE / side))), Image.Resampling.BILINEAR)
        square = np.zeros((NUDENET_SIZE, NUDENET_SIZE, 3), np.float32)
        square[:small.size[1], :small.size[0]] = np.asarray(small, dtype=np.float32)
        return square.transpose(2, 0, 1) * (1.0 / 255.0)

    @property
    def nudenet_scale(self) -> float:
        """Multiply a box in NudeNet's 320 px frame by this to get full-size pixels."""
        return max(self.size) / NUDENET_SIZE

    @cached_property
    def opennsfw_input(self) -> np.ndarray:
        return opennsfw_preprocess(self.work)

    def crop_for_opennsfw(self, box, context: float) -> np.ndarray:
        """open_nsfw input for a square of `context` times the box's size around its centre
        (box in full-size pixels)."""
        x, y, bw, bh = (v / self.to_full for v in box)
        w, h = self.work.size
        side = max(bw, bh) * context
        cx, cy = x + bw / 2, y + bh / 2
        x0, y0 = max(0, int(cx - side / 2)), max(0, int(cy - side / 2))
        x1, y1 = min(w, int(cx + side / 2)), min(h, int(cy + side / 2))
        return opennsfw_preprocess(self.work.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))))


def opennsfw_preprocess(img: Image.Image) -> np.ndarray:
    """Yahoo open_nsfw's reference preprocessing: 256x256 bilinear, centre crop 224, a JPEG
    round trip (the reference decodes JPEG), BGR, mean subtracted; 224 x 224 x 3 float32."""
    img = img.resize((OPENNSFW_RESIZE, OPENNSFW_RESIZE), Image.Resampling.BILINEAR)
    off = (OPENNSFW_RESIZE - OPENNSFW_CROP) // 2
    img = img.crop((off, off, off + OPENNSFW_CROP, off + OPENNSFW_CROP))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    buf.seek(0)
    arr = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32)
    return np.ascontiguousarray(arr[:, :, ::-1] - OPENNSFW_MEAN_BGR)
