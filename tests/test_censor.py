import numpy as np
import pytest

from consent_guard.censor import censor_regions, grow, placeholder, render
from consent_guard.verdict import Decision, Verdict


def noisy(h=80, w=100):
    return np.random.default_rng(1).integers(0, 256, (h, w, 3), np.uint8)


def test_only_the_grown_region_changes():
    img = noisy()
    out = censor_regions(img, [(20, 20, 30, 20)], "pixelate", margin=0.1)
    x, y, w, h = grow((20, 20, 30, 20), 0.1, 100, 80)
    mask = np.zeros(img.shape[:2], bool)
    mask[y:y + h, x:x + w] = True
    assert np.array_equal(out[~mask], img[~mask])
    assert not np.array_equal(out[mask], img[mask])
    # pixelated to about 6 cells across: far fewer distinct colours than the noise had
    assert len(np.unique(out[mask].reshape(-1, 3), axis=0)) <= 64


def test_black_and_blur_styles():
    img = noisy()
    assert censor_regions(img, [(0, 0, 10, 10)], "black", 0)[:10, :10].max() == 0
    blurred = censor_regions(img, [(0, 0, 50, 50)], "blur", 0)[:50, :50].astype(float)
    assert blurred.std() < img[:50, :50].astype(float).std() / 2


def test_grow_clips_to_image():
    assert grow((90, 70, 20, 20), 0.5, 100, 80) == (80, 60, 20, 20)


def test_render_by_decision():
    img = noisy()
    assert render(img, Verdict(Decision.ALLOW), "pixelate", 0.1) is img
    assert render(img, Verdict(Decision.BLOCK), "pixelate", 0.1) is None
    censored = render(img, Verdict(Decision.CENSOR, regions=((1, 1, 5, 5),)), "pixelate", 0.1)
    assert censored.shape == img.shape and not np.array_equal(censored, img)


def test_placeholder_any_size():
    for w, h in ((1, 1), (7, 300), (1024, 1024)):
        p = placeholder(w, h, "a reason that is long enough to wrap over several lines " * 3)
        assert p.shape == (h, w, 3) and p.dtype == np.uint8


def _ink_box(p, colour_test):
    ys, xs = np.nonzero(colour_test(p.astype(int)))
    return (ys.min(), ys.max(), xs.min(), xs.max()) if len(ys) else None


def _light(p):  # the words: near-white or amber on dark grey
    return p.min(axis=-1) > 150


def test_placeholder_words_scale_with_the_image():
    """At node size (a few hundred px shown, any size made) the words must stay readable: they
    take the same share of the picture whatever its size, not a fixed number of pixels."""
    shares = []
    for side in (128, 512, 2048):
        p = placeholder(side, side, kind="output_explicit", locale="en")
        y0, y1, x0, x1 = _ink_box(p, _light)
        shares.append(((y1 - y0) / side, (x1 - x0) / side))
    for h, w in shares:
        assert 0.12 < h < 0.6 and 0.3 < w < 0.95, shares
    assert max(h for h, _ in shares) / min(h for h, _ in shares) < 1.3, shares


def test_placeholder_has_a_large_symbol():
    p = placeholder(400, 300, kind="output_protected", locale="en")
    red = _ink_box(p, lambda a: (a[..., 0] > 200) & (a[..., 1] < 120))
    assert red is not None and (red[1] - red[0]) > 0.3 * 300  # the sign spans a third or more


def test_placeholder_language_and_font_fallback(monkeypatch):
    import consent_guard.censor as censor

    en = placeholder(300, 300, kind="output_explicit", locale="en")
    assert not np.array_equal(placeholder(300, 300, kind="output_explicit", locale="id"), en)
    monkeypatch.setattr(censor, "cjk_font_path", lambda: None)
    # no font with Hangul: English words rather than empty boxes
    assert np.array_equal(placeholder(300, 300, kind="output_explicit", locale="ko"), en)


def test_placeholder_for_a_verdict_says_no_label():
    from consent_guard.censor import placeholder_for

    verdict = Verdict(Decision.BLOCK, reasons=())
    assert placeholder_for(0, 0, verdict).shape == (1, 1, 3)
    explicit = placeholder(200, 100, kind="output_explicit")
    assert np.array_equal(placeholder_for(200, 100, verdict), explicit)


def test_a_font_without_hangul_is_not_taken_for_korean():
    from PIL import ImageFont

    from consent_guard.censor import _has_glyph

    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 24)  # Latin, Greek, Cyrillic: no Hangul
    except OSError:
        pytest.skip("DejaVu Sans is not installed")
    assert _has_glyph(font, "A") and not _has_glyph(font, "\ucc28")
