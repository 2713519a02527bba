"""Turning a verdict into pixels: censored regions, or a placeholder that says why."""
from __future__ import annotations

import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .verdict import Box, Decision, Verdict


def grow(box: Box, margin: float, width: int, height: int) -> Box:
    x, y, w, h = box
    dx, dy = w * margin, h * margin
    x0, y0 = max(0, int(x - dx)), max(0, int(y - dy))
    x1, y1 = min(width, int(round(x + w + dx))), min(height, int(round(y + h + dy)))
    return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


def censor_regions(rgb: np.ndarray, regions: Sequence[Box], style: str = "pixelate",
                   margin: float = 0.15) -> np.ndarray:
    """A copy of `rgb` with each region pixelated (about 6 cells across), blurred or blacked."""
    out = rgb.copy()
    h, w = rgb.shape[:2]
    for box in regions:
        x, y, bw, bh = grow(box, margin, w, h)
        if bw == 0 or bh == 0:
            continue
        patch = out[y:y + bh, x:x + bw]
        if style == "black":
            patch[...] = 0
            continue
        img = Image.fromarray(patch)
        if style == "blur":
            img = img.filter(ImageFilter.GaussianBlur(radius=max(bw, bh) / 6))
        else:
            long_side = max(bw, bh)
            cells = max(1, min(6, long_side // 4))  # a tiny region becomes one flat colour
            small = img.resize((max(1, bw * cells // long_side), max(1, bh * cells // long_side)),
                               Image.Resampling.BOX)
            img = small.resize((bw, bh), Image.Resampling.NEAREST)
        out[y:y + bh, x:x + bw] = np.asarray(img)
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def placeholder(width: int, height: int, message: str) -> np.ndarray:
    """A dark grey image of the given size with the message written on it."""
    img = Image.new("RGB", (width, height), (48, 48, 52))
    draw = ImageDraw.Draw(img)
    size = max(10, min(width, height) // 20)
    font = _font(size)
    chars = max(12, int(width / (size * 0.6)) - 2)
    lines = []
    for para in ("Blocked by Consent Guard", *message.splitlines()):
        lines.extend(textwrap.wrap(para, chars) or [""])
    y = max(2, (height - len(lines) * (size + 4)) // 2)
    for line in lines:
        draw.text((max(2, size // 2), y), line, fill=(235, 235, 235), font=font)
        y += size + 4
    return np.asarray(img)


def render(rgb: np.ndarray, verdict: Verdict, style: str, margin: float) -> Optional[np.ndarray]:
    """The pixels that may be written for this verdict: the image, a censored copy, or None."""
    if verdict.decision is Decision.ALLOW:
        return rgb
    if verdict.decision is Decision.CENSOR and verdict.regions:
        return censor_regions(rgb, verdict.regions, style, margin)
    return None
