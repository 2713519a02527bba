"""The face protocols. A backend is a detector and an embedder behind these two interfaces.

Landmarks are the five points every modern detector gives (YuNet, SCRFD/RetinaFace), in the
same order: the eye on the image's left, the eye on the image's right, the nose tip, the mouth
corner on the image's left, the mouth corner on the image's right. Any embedder can therefore
align a face found by any detector.

An embedding is only ever compared with embeddings made by the same embedder: `model_id` is
stored with every embedding in the registry, and matching selects on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Face:
    box: tuple  # x, y, w, h (floats) in the pixels of the image it was found in
    score: float  # detection confidence, 0..1
    landmarks: np.ndarray  # (5, 2) float32, same pixels, in the order described above

    def scaled(self, factor: float) -> "Face":
        """The same face in an image `factor` times larger."""
        return Face(tuple(float(v) * factor for v in self.box), self.score,
                    (self.landmarks * factor).astype(np.float32))

    @property
    def size(self) -> float:
        """The shorter side of the box, in pixels: what a minimum face size is measured on."""
        return float(min(self.box[2], self.box[3]))


@runtime_checkable
class FaceDetector(Protocol):
    """Finds faces with five landmarks in an RGB uint8 image (H x W x 3)."""

    name: str

    def detect(self, rgb: np.ndarray) -> List[Face]: ...


@runtime_checkable
class FaceEmbedder(Protocol):
    """Turns aligned faces into L2-normalised vectors. `model_id` names the exact weights
    (it is stored with each embedding); `threshold` is the cosine similarity at and above which
    two faces are taken to be the same person, measured for this model (see bench/faces.py)."""

    model_id: str
    dim: int
    threshold: float

    def embed(self, rgb: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
        """(len(faces), dim) float32, each row of unit length. `faces` are in `rgb`'s pixels."""
        ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)
