"""Shared fixtures. No explicit image exists anywhere in these tests: the positive paths go
through test doubles at the detector interface; the real models only ever see benign photos."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest

from consent_guard.detectors.base import PartDetection
from consent_guard.prepare import PreparedImage

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def package_file(package: str, relpath: str) -> Path:
    """A data file inside an installed pip package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {package} is not installed (install.py --dev installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture
def t1_jpg() -> Path:
    return package_file("insightface", "data/images/t1.jpg")  # 6 adults, a group photo


@pytest.fixture
def astronaut_png() -> Path:
    return package_file("skimage", "data/astronaut.png")  # adult portrait, public domain


@pytest.fixture
def shared_eval() -> Path:
    path = SHARED / "eval"
    if not path.is_dir():
        pytest.skip("../shared/eval is absent (only developers' and CI's checkouts have it)")
    return path


def key_of(image: PreparedImage) -> int:
    """Test images are keyed by the value of their top-left pixel's red channel."""
    return int(np.asarray(image.work)[0, 0, 0])


def keyed_image(key: int, size=(64, 48)) -> np.ndarray:
    w, h = size
    img = np.random.default_rng(key).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[0, 0, 0] = key
    return img


class FakeParts:
    """PartDetector double: detections chosen per image key."""

    name = "fake_parts"

    def __init__(self, by_key: Optional[Dict[int, List[PartDetection]]] = None, error=None):
        self.by_key, self.error, self.calls = by_key or {}, error, []

    def detect(self, images: Sequence[PreparedImage]):
        self.calls.append(len(images))
        if self.error:
            raise self.error
        return [list(self.by_key.get(key_of(im), [])) for im in images]


class FakeScorer:
    """ImageScorer double: whole-image and region scores chosen per image key."""

    name = "fake_scorer"

    def __init__(self, whole: Optional[Dict[int, float]] = None,
                 region: Optional[Dict[int, float]] = None):
        self.whole, self.region, self.region_calls = whole or {}, region or {}, 0

    def score(self, images):
        return [self.whole.get(key_of(im), 0.0) for im in images]

    def score_regions(self, image, boxes, context):
        self.region_calls += 1
        return [self.region.get(key_of(image), 0.0) for _ in boxes]
