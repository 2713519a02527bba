"""NudeNet v3 (320n) part detector on onnxruntime, with NudeNet's own pre- and post-processing
(nudenet/nudenet.py: pad bottom/right to a square, 320 px, RGB/255; keep rows scoring >= 0.2,
class-agnostic NMS at IoU 0.45), vectorised, batched, and fed from the shared PreparedImage."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np

from ..prepare import PreparedImage
from .base import PartDetection

LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)
SCORE_FLOOR = 0.2  # NudeNet drops rows below this before NMS
NMS_IOU = 0.45
BATCH = 8


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> List[int]:
    """Greedy NMS over x, y, w, h boxes; indices of kept boxes, best first."""
    order = np.argsort(-scores, kind="stable")
    x1, y1 = boxes[:, 0], boxes[:, 1]
    x2, y2 = x1 + boxes[:, 2], y1 + boxes[:, 3]
    area = np.maximum(boxes[:, 2], 0) * np.maximum(boxes[:, 3], 0)
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        iw = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = iw * ih
        union = area[i] + area[rest] - inter
        overlap = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)
        order = rest[overlap <= iou]
    return keep


def postprocess(output: np.ndarray, image: PreparedImage) -> List[PartDetection]:
    """output: 22 x N for one image (4 box values, 18 class scores)."""
    rows = output.T
    class_scores = rows[:, 4:]
    best = class_scores.max(axis=1)
    mask = best >= SCORE_FLOOR
    if not mask.any():
        return []
    rows, best = rows[mask], best[mask]
    cls = class_scores[mask].argmax(axis=1)
    cx, cy, bw, bh = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    s = image.nudenet_scale
    w_img, h_img = image.size
    x = np.clip((cx - bw / 2) * s, 0, w_img)
    y = np.clip((cy - bh / 2) * s, 0, h_img)
    w = np.minimum(bw * s, w_img - x)
    h = np.minimum(bh * s, h_img - y)
    boxes = np.stack([x, y, w, h], axis=1)
    return [PartDetection(LABELS[int(cls[i])], float(best[i]),
                          tuple(int(v) for v in boxes[i]))  # type: ignore[arg-type]
            for i in nms(boxes, best, NMS_IOU)]


class NudeNetDetector:
    name = "nudenet"

    def __init__(self, session):
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def detect(self, images: Sequence[PreparedImage]) -> List[List[PartDetection]]:
        results: List[List[PartDetection]] = []
        for start in range(0, len(images), BATCH):
            chunk = images[start:start + BATCH]
            batch = np.stack([im.nudenet_input for im in chunk])
            (out,) = self.session.run(None, {self.input_name: batch})
            results.extend(postprocess(out[j], im) for j, im in enumerate(chunk))
        return results
