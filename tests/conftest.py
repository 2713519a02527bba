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


class FakeFaces:
    """FaceDetector and FaceEmbedder double in one: the people in an image are chosen per image
    key; face i sits at x = 50 * i, 48 px square, and each person has a fixed unit vector."""

    name = "fake_faces"
    dim = 16
    threshold = 0.5

    def __init__(self, people_by_key: Dict[int, List[str]], model_id: str = "fake-000000000001",
                 error: Optional[Exception] = None):
        self.people_by_key, self.model_id, self.error = people_by_key, model_id, error
        self.embedded = 0

    @staticmethod
    def vector(person: str) -> np.ndarray:
        v = np.random.default_rng(sum(map(ord, person))).standard_normal(16).astype(np.float32)
        return v / np.linalg.norm(v)

    def detect(self, rgb):
        from consent_guard.faces.base import Face

        if self.error:
            raise self.error
        people = self.people_by_key.get(int(rgb[0, 0, 0]), [])
        return [Face((50.0 * i, 0.0, 48.0, 48.0), 0.9,
                     np.array([[50 * i + 14, 18], [50 * i + 34, 18], [50 * i + 24, 28],
                               [50 * i + 16, 38], [50 * i + 32, 38]], np.float32))
                for i in range(len(people))]

    def embed(self, rgb, faces):
        people = self.people_by_key.get(int(rgb[0, 0, 0]), [])
        self.embedded += len(faces)
        return np.array([self.vector(people[int(f.box[0] // 50)]) for f in faces],
                        np.float32).reshape(len(faces), self.dim)


def fake_backend(people_by_key, **kw):
    from consent_guard.faces.backends import FaceBackend

    faces = FakeFaces(people_by_key, **kw)
    return FaceBackend("fake", faces, faces)
