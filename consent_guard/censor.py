"""Turning a verdict into pixels: censored regions, or a placeholder that says why."""
from __future__ import annotations

import functools
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


def _font(size: int, path: Optional[str] = None):
    """A TrueType font of `size` px: `path`, else Pillow's own (Latin only)."""
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


# Fonts with Hangul (and other CJK) glyphs where systems usually have them; Pillow's
# truetype() also looks a bare name up in the system's font folders.
CJK_FONTS = ("NotoSansCJK-Regular.ttc", "NotoSansCJKkr-Regular.otf", "NotoSansKR-Regular.otf",
             "NotoSansKR-Regular.ttf", "NanumGothic.ttf", "NanumBarunGothic.ttf", "UnDotum.ttf",
             "malgun.ttf", "AppleSDGothicNeo.ttc", "AppleGothic.ttf",
             "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
             "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
             "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
             "/usr/share/fonts/truetype/nanum/NanumGothic.ttf",
             "C:/Windows/Fonts/malgun.ttf", "/System/Library/Fonts/AppleSDGothicNeo.ttc")


@functools.lru_cache(maxsize=1)
def cjk_font_path() -> Optional[str]:
    """The first font found that draws Hangul, or None (then placeholders are in English
    rather than a row of empty boxes)."""
    for name in CJK_FONTS:
        try:
            font = ImageFont.truetype(name, 24)
            if _has_glyph(font, "\ucc28"):  # Hangul "차"
                return getattr(font, "path", name)
        except (OSError, ValueError):
            continue
    return None


def _has_glyph(font, char: str) -> bool:
    """Whether the font draws `char` itself, not its "missing glyph" box."""
    drawn = font.getmask(char)
    missing = font.getmask("\U0010fffd")  # a private-use code point no font draws
    return bool(drawn.getbbox()) and (drawn.size != missing.size or
                                      bytes(drawn) != bytes(missing))


def needs_cjk(text: str) -> bool:
    return any(ord(c) >= 0x2E80 for c in text)


def _fitted(draw: ImageDraw.ImageDraw, text: str, size: int, max_width: float,
            path: Optional[str]):
    """The font at `size` px, made smaller until `text` fits `max_width` (at least 6 px)."""
    while True:
        font = _font(size, path)
        if size <= 6 or draw.textlength(text, font=font) <= max_width:
            return font
        size = max(6, int(size * 0.85))


def _no_sign(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    """A large circle with a bar through it, drawn (no font needed)."""
    if r < 2:
        return
    line = max(1, int(r * 0.16))
    colour = (226, 80, 80)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=line)
    d = r * 0.70
    draw.line((cx - d, cy - d, cx + d, cy + d), fill=colour, width=line)


def placeholder(width: int, height: int, message: str = "", kind: Optional[str] = None,
                locale: Optional[str] = None) -> np.ndarray:
    """A dark grey image of the given size that says why the picture is not shown: a large
    symbol, "Blocked", by whom and why, all sized from min(width, height) so the words stay
    readable when the image is shown small (a node's preview) or large. `kind`: a refusal kind
    (consent_guard/messages.py) for the reason, in `locale`'s language; else `message`.
    Korean needs a CJK font: without one the words are English."""
    from . import messages

    img = Image.new("RGB", (width, height), (48, 48, 52))
    draw = ImageDraw.Draw(img)
    title, by, reason = messages.placeholder_words(kind, locale)
    if not kind and message:
        reason = message
    path = None
    if needs_cjk(title + by + reason):
        path = cjk_font_path()
        if path is None:
            title, by, reason = messages.placeholder_words(kind, "en")
            reason = reason or message
    side = min(width, height)
    lines = [(title, 0.13, (240, 240, 240))]
    lines += [(by, 0.065, (200, 200, 205))]
    max_width = width * 0.9
    size_reason = max(6, int(side * 0.075))
    probe = _font(size_reason, path)
    chars = max(8, int(max_width / max(1.0, probe.getlength("n") * 1.05)))
    for i, part in enumerate(textwrap.wrap(reason, chars)[:4] if reason else []):
        lines.append((part, 0.075, (235, 200, 120)))
    fonts = [_fitted(draw, text, max(6, int(side * share)), max_width, path)
             for text, share, _ in lines]
    heights = [max(6, int(f.size if hasattr(f, "size") else 10) * 1.25) for f in fonts]
    radius = side * 0.2
    total = 2 * radius + side * 0.06 + sum(heights)
    y = max(0.0, (height - total) / 2)
    _no_sign(draw, width / 2, y + radius, radius)
    y += 2 * radius + side * 0.06
    for (text, _, colour), font, h in zip(lines, fonts, heights):
        draw.text((width / 2, y), text, fill=colour, font=font, anchor="ma")
        y += h
    return np.asarray(img)


def placeholder_for(width: int, height: int, verdict: Verdict,
                    locale: Optional[str] = None) -> np.ndarray:
    """The placeholder for a picture that was made and is not shown, with the reason in
    words (never a label, score or name)."""
    from .messages import kind_for

    return placeholder(max(width, 1), max(height, 1), kind=kind_for(verdict, "output"),
                       locale=locale)


def render(rgb: np.ndarray, verdict: Verdict, style: str, margin: float) -> Optional[np.ndarray]:
    """The pixels that may be written for this verdict: the image, a censored copy, or None."""
    if verdict.decision is Decision.ALLOW:
        return rgb
    if verdict.decision is Decision.CENSOR and verdict.regions:
        return censor_regions(rgb, verdict.regions, style, margin)
    return None
