"""Decode once, resize once, and share the result between the models.

A PreparedImage keeps the full-size RGB pixels (for censoring and region crops) and one
working copy no larger than WORK_SIZE on its long side, from which each model's input is cut.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from PIL import Image

WORK_SIZE = 640  # long side of the shared working copy (>= both models' input sizes)
NUDENET_SIZE = 320
OPENNSFW_RESIZE, OPENNSFW_CROP = 256, 224
OPENNSFW_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)


@dataclass(eq=False)
class PreparedImage:
    rgb: np.ndarray  # H x W x 3 uint8, the image as it will be saved
    _work: Image.Image = field(init=False, repr=False)

    def __post_init__(self):
        h, w = self.rgb.shape[:2]
        img = Image.fromarray(self.rgb)
        scale = WORK_SIZE / max(h, w)
        if scale < 1.0:
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                             Image.Resampling.BILINEAR, reducing_gap=2.0)
        self._work = img

    @property
    def size(self):
        h, w = self.rgb.shape[:2]
        return w, h

    @cached_property
    def nudenet_input(self) -> np.ndarray:
        """3 x 320 x 320 float32, RGB/255, padded bottom/right to a square as NudeNet does."""
        w, h = self._work.size
        side = max(w, h)
        square = Image.new("RGB", (side, side))
        square.paste(self._work, (0, 0))
        small = square.resize((NUDENET_SIZE, NUDENET_SIZE), Image.Resampling.BILINEAR)
        return np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0

    @property
    def nudenet_scale(self) -> float:
        """Multiply a box in NudeNet's 320 px frame by this to get original pixels."""
        w, h = self.size
        return max(w, h) / NUDENET_SIZE

    @cached_property
    def opennsfw_input(self) -> np.ndarray:
        return opennsfw_preprocess(self._work)

    def crop_for_opennsfw(self, box, context: float) -> np.ndarray:
        """open_nsfw input for a square of `context` times the box's size around its centre."""
        x, y, bw, bh = box
        w, h = self.size
        side = max(bw, bh) * context
        cx, cy = x + bw / 2, y + bh / 2
        x0, y0 = max(0, int(cx - side / 2)), max(0, int(cy - side / 2))
        x1, y1 = min(w, int(cx + side / 2)), min(h, int(cy + side / 2))
        crop = Image.fromarray(self.rgb[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)])
        return opennsfw_preprocess(crop)


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
