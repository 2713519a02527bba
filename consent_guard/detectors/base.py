"""The detector protocols. A backend is a file that implements one and a line in the manifest.

Test doubles implement these same protocols, which is how the positive paths are tested
without any explicit image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Protocol, Sequence, runtime_checkable

from ..prepare import PreparedImage
from ..verdict import Box


@dataclass(frozen=True)
class PartDetection:
    label: str  # e.g. "FEMALE_BREAST_EXPOSED"
    score: float
    box: Box  # x, y, w, h in the original image's pixels


@runtime_checkable
class PartDetector(Protocol):
    """Finds body parts and returns them with boxes (NudeNet)."""

    name: str

    def detect(self, images: Sequence[PreparedImage]) -> List[List[PartDetection]]: ...


@runtime_checkable
class ImageScorer(Protocol):
    """Scores how explicit a whole picture, or a region of it, is, from 0 to 1 (open_nsfw)."""

    name: str

    def score(self, images: Sequence[PreparedImage]) -> List[float]: ...

    def score_regions(self, image: PreparedImage, boxes: Sequence[Box],
                      context: float) -> List[float]: ...
