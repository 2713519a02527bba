"""Enrolment: turn a person's photos into embeddings, refusing photos that would enrol badly.

A photo must hold exactly one usable face: large enough, confidently detected, and sharp.
The embedding is made by every backend available here (SFace, and InsightFace when a pack is
present), so that switching backend later does not leave anyone unprotected. Photos are read,
embedded and forgotten: nothing of them is stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..imageio import ImageInputError, read_image_frames
from .backends import FaceBackend
from .base import Face
from .stage import detect_faces

# Measured on ../shared/eval/faces/deepface (65 ordinary photos): every face there has a box of
# at least 105 px, a YuNet score of at least 0.92 and a sharpness of at least 156; a Gaussian
# blur of sigma 3 brings most faces under 100. See docs/identities.md.
ENROL_MIN_FACE_PX = 80
ENROL_MIN_SCORE = 0.8
ENROL_MIN_SHARPNESS = 80.0


@dataclass(frozen=True)
class PhotoCheck:
    source: str
    ok: bool
    reason: str  # why it was refused, or what was accepted
    face: Optional[Face] = None


def sharpness(rgb: np.ndarray, face: Face) -> float:
    """Variance of the Laplacian of the face, grey, at 112 x 112: low means blurred."""
    x, y, w, h = face.box
    crop = Image.fromarray(rgb).crop((int(max(0, x)), int(max(0, y)), int(x + w), int(y + h)))
    a = np.asarray(crop.convert("L").resize((112, 112), Image.Resampling.BILINEAR), np.float32)
    lap = a[1:-1, :-2] + a[1:-1, 2:] + a[:-2, 1:-1] + a[2:, 1:-1] - 4 * a[1:-1, 1:-1]
    return float(lap.var())


def assess(rgb: np.ndarray, faces: Sequence[Face]) -> Tuple[Optional[Face], str]:
    """The one usable face in a photo, or None and the reason it is refused."""
    if not faces:
        return None, "no face found"
    usable, problems = [], []
    for f in faces:
        if f.size < ENROL_MIN_FACE_PX:
            problems.append(f"face too small ({f.size:.0f} px, need {ENROL_MIN_FACE_PX})")
        elif f.score < ENROL_MIN_SCORE:
            problems.append(f"face not clear enough (detection score {f.score:.2f}, need "
                            f"{ENROL_MIN_SCORE})")
        else:
            sharp = sharpness(rgb, f)
            if sharp < ENROL_MIN_SHARPNESS:
                problems.append(f"face blurred (sharpness {sharp:.0f}, need "
                                f"{ENROL_MIN_SHARPNESS:.0f})")
            else:
                usable.append(f)
    if len(usable) > 1:
        return None, (f"{len(usable)} faces found; use a photo of this person alone, or crop "
                      f"it to their face")
    if not usable:
        return None, "; ".join(dict.fromkeys(problems))
    return usable[0], f"one face, {usable[0].size:.0f} px, score {usable[0].score:.2f}"


def embed_photos(sources: Sequence, backends: Sequence[FaceBackend], max_pixels: int,
                 detect_size: int = 640) -> Tuple[Dict[str, np.ndarray], List[PhotoCheck]]:
    """Embeddings per embedder model_id from the accepted photos, and a check per photo.
    `sources` are file paths or RGB arrays. The first backend's detector finds the face; each
    backend's embedder embeds it."""
    if not backends:
        raise ValueError("no face backend to enrol with")
    detector = backends[0].detector
    vectors: Dict[str, List[np.ndarray]] = {b.embedder.model_id: [] for b in backends}
    checks = []
    for src in sources:
        label = str(src) if isinstance(src, (str, Path)) else "<image>"
        try:
            if isinstance(src, (str, Path)):
                frames, _ = read_image_frames(Path(src), max_pixels)
                rgb = frames[0]
            else:
                rgb = np.asarray(src)
        except ImageInputError as exc:
            checks.append(PhotoCheck(label, False, f"unusable image: {exc}"))
            continue
        face, why = assess(rgb, detect_faces(detector, rgb, detect_size))
        checks.append(PhotoCheck(label, face is not None, why, face))
        if face is not None:
            for b in backends:
                vectors[b.embedder.model_id].append(b.embedder.embed(rgb, [face]))
    return ({m: np.vstack(v) for m, v in vectors.items() if v}, checks)
