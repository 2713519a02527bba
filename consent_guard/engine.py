"""The engine: the only place that decides. Adapters hand it pixels and act on its Verdict."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from . import censor
from .detectors.base import ImageScorer, PartDetector
from .explicit import check_explicit
from .imageio import ImageInputError, read_image_frames, to_rgb_uint8
from .models import ModelError, ModelResolver, onnx_session
from .policy import Policy
from .prepare import WORK_SIZE, PreparedImage
from .verdict import Decision, Verdict

log = logging.getLogger("consent_guard")


class Engine:
    """Checks images against a policy. Detectors are loaded on first use; if they cannot be,
    every check fails closed with the loader's message."""

    def __init__(self, policy: Optional[Policy] = None, *, parts: Optional[PartDetector] = None,
                 scorer: Optional[ImageScorer] = None, model_dirs: Sequence[Path] = ()):
        self.policy = policy or Policy()
        self._parts, self._scorer = parts, scorer
        self._model_dirs = list(model_dirs)
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the default detectors now (raises ModelError with the fix if one is missing)."""
        with self._lock:
            if self._parts is not None and self._scorer is not None:
                return
            from .detectors.nudenet import NudeNetDetector
            from .detectors.opennsfw import OpenNSFWScorer

            resolver = ModelResolver(self.policy.model_paths, self._model_dirs)
            if self._parts is None:
                self._parts = NudeNetDetector(
                    onnx_session(resolver.resolve("nudenet_320n"), self.policy.device))
            if self._scorer is None:
                self._scorer = OpenNSFWScorer(
                    onnx_session(resolver.resolve("open_nsfw"), self.policy.device))

    def check_images(self, pixels: Sequence[np.ndarray],
                     full_size: Optional[Tuple[int, int]] = None) -> List[Verdict]:
        """One verdict per image; the batch goes through each model together. Never raises for
        a bad image or a failing model: that image's verdict is a block that says why.
        `full_size` is given when the pixels were decoded at reduced scale (regions are
        reported in full-size pixels)."""
        verdicts: List[Optional[Verdict]] = [None] * len(pixels)
        prepared, index = [], []
        for i, px in enumerate(pixels):
            try:
                rgb = to_rgb_uint8(px)
                h, w = rgb.shape[:2]
                if h * w > self.policy.max_pixels:
                    raise ImageInputError(f"too large to check: {w}x{h}, over the policy limit "
                                          f"of {self.policy.max_pixels} pixels")
                prepared.append(PreparedImage(rgb, full_size))
                index.append(i)
            except ImageInputError as exc:
                verdicts[i] = Verdict.failed(f"unusable image: {exc}")
        if prepared:
            try:
                self.load()
                results = check_explicit(prepared, self._parts, self._scorer, self.policy)
            except ModelError as exc:
                log.error("Consent Guard cannot check images: %s", exc)
                results = [Verdict.failed(str(exc))] * len(prepared)
            except Exception as exc:  # fail closed: a detector that raises blocks the image
                log.exception("Consent Guard check raised")
                results = [Verdict.failed(f"the check raised {type(exc).__name__}: {exc}")
                           ] * len(prepared)
            for i, v in zip(index, results):
                verdicts[i] = v
        return verdicts  # type: ignore[return-value]

    def check_image(self, pixels: np.ndarray) -> Verdict:
        return self.check_images([pixels])[0]

    def check_file(self, path: Path) -> Verdict:
        """Every frame of an image file; the strictest frame's verdict stands for the file."""
        try:
            frames, size = read_image_frames(path, self.policy.max_pixels, draft_size=WORK_SIZE)
        except ImageInputError as exc:
            return Verdict.failed(f"unusable image: {exc}")
        verdicts = self.check_images(frames, size)
        return max(verdicts, key=lambda v: (v.error is not None, v.decision.rank))

    def render(self, pixels: np.ndarray, verdict: Verdict) -> Optional[np.ndarray]:
        """What may be written for this verdict: the image, a censored copy, or None (block)."""
        return censor.render(to_rgb_uint8(pixels), verdict, self.policy.censor_style,
                             self.policy.censor_margin)

    def output_for(self, pixels: np.ndarray, verdict: Verdict) -> np.ndarray:
        """What a UI shows in the image's place: the image, a censored copy or a placeholder."""
        out = None if verdict.error else self.render(pixels, verdict)
        if out is not None:
            return out
        h, w = np.asarray(pixels).shape[:2]
        return self.placeholder(w, h, verdict)

    @staticmethod
    def placeholder(width: int, height: int, verdict: Verdict) -> np.ndarray:
        """A stand-in image of the given size that says why the original is not shown."""
        return censor.placeholder(max(width, 1), max(height, 1), verdict.summary())


__all__ = ["Engine", "Decision", "Verdict"]
