import numpy as np

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
