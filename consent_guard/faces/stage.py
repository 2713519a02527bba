"""The face stage: find faces, embed them, match them against the registry, apply the scopes.

Detection runs on a copy cut down to DETECT_SIZE on the long side (faces in generated images
are large; small ones are below the matching minimum anyway); alignment and embedding use the
pixels as given, so a face is embedded at the best resolution available.
"""
from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageFilter

from ..models import usable_cpus
from ..verdict import Decision, FaceFinding, Reason, Verdict
from .base import Face, FaceDetector, FaceEmbedder
from .matching import Gallery
from .median import median_filter

DETECT_SIZE = 640


MIN_DETECTED = 10  # px: faces smaller than this in the detector's copy are not found
MIN_FACE = 32  # px: the default smallest face to find (policy [faces] min_face_px)


def detect_faces(detector: FaceDetector, rgb: np.ndarray, detect_size: int = DETECT_SIZE,
                 min_face: float = MIN_FACE, tiles: bool = True) -> List[Face]:
    """Faces in `rgb`'s pixels, found on a copy no larger than `detect_size`. When that copy
    would shrink a face of `min_face` px below what the detector finds (a large or very long
    picture: a face 3 px tall in the copy of a 16384 x 512 strip was missed), the picture is
    also searched on a finer copy, where such a face is MIN_DETECTED px (in tiles when that
    copy is large: fine_tiles), unless `tiles` is False (a cheap first pass)."""
    return faces_in_copies(detector, detection_copies(rgb, detect_size, min_face, tiles))


def detection_copies(rgb: np.ndarray, detect_size: int = DETECT_SIZE,
                     min_face: float = MIN_FACE, tiles: bool = True
                     ) -> List[Tuple[np.ndarray, float]]:
    """The copies detect_faces searches, each with its scale to rgb: rgb itself when it is
    no larger than `detect_size`; else rgb cut down to `detect_size`, and, when a face of
    `min_face` px would be under MIN_DETECTED px there (and `tiles`), rgb cut down only so
    far that it is MIN_DETECTED px. That fine copy is one resize of the picture; the tiles it
    replaces (each cut from the full-size picture, resized and searched on its own) read up to
    (4/3)^2 = 1.8x the picture's pixels through their quarter overlaps and ran the detector
    on as much more (bench/face_search.py part 3; bench/speed.py --cases faces)."""
    h, w = rgb.shape[:2]
    scale = detect_size / max(h, w)
    if scale >= 1.0:
        return [(rgb, 1.0)]
    copies = [(cut_down(rgb, scale), scale)]
    if tiles and min_face * scale < MIN_DETECTED:
        fine = min(1.0, MIN_DETECTED / min_face)
        copies.append((cut_down(rgb, fine) if fine < 1.0 else rgb, fine))
    return copies


def faces_in_copies(detector: FaceDetector, copies: Sequence[Tuple[np.ndarray, float]],
                    how=None) -> List[Face]:
    """The faces of detection_copies' copies, in the picture's pixels (turned by `how`, a
    TURNS entry, when given: each copy is turned before it is searched, so a turned copy of
    the picture needs no full-size turn of its own). One face for each place."""
    faces: List[Face] = []
    for i, (copy, scale) in enumerate(copies):
        copy = copy if how is None else turned(copy, how)
        found = fine_tiles(detector, copy) if i else detector.detect(
            np.ascontiguousarray(copy))
        faces += found if scale == 1.0 else [f.scaled(1.0 / scale) for f in found]
    return faces if len(copies) == 1 else _distinct(faces)


FINE_TILE = 1280  # px: the fine copy is searched in tiles no larger (bounds the detector's memory)


def fine_tiles(detector: FaceDetector, copy: np.ndarray, side: int = FINE_TILE) -> List[Face]:
    """detector.detect on `copy`, in overlapping tiles of at most `side` px when it is larger
    (a quarter overlap: a face up to side / 4 is whole in one; larger faces are the coarse
    copy's to find)."""
    h, w = copy.shape[:2]
    if max(h, w) <= side:
        return detector.detect(np.ascontiguousarray(copy))
    step = max(1, side * 3 // 4)
    faces: List[Face] = []
    for y in _starts(h, side, step):
        for x in _starts(w, side, step):
            tile = np.ascontiguousarray(copy[y:y + side, x:x + side])
            faces += [_moved(f, x, y) for f in detector.detect(tile)]
    return faces


# Pillow's reducing_gap: a picture more than this many times the size asked for is first
# reduced by a whole factor (a box filter over factor x factor pixels), and the rest resized
# bilinearly. A bilinear resize straight from full size reads a kernel as wide as the factor:
# 2280 x 1588 -> 640 px took 19.4 ms, reduced first 8.8 ms; -> 320 px 15.0 -> 6.0 ms (this
# 2-core CPU). Under a factor of 2 (a 1024 px picture to 640) nothing changes. Not for the
# cleaned copies' base (CLEAN_SIZE): the bilinear kernel's width washes out a grid of 1 px
# lines better than a box reduce does, and the median and blur are made to undo such a grid
# (bench/face_search.py --side 2500: one grid probe matched through the blur at 0.43 with
# the bilinear base, 0.33 with a reduced one).
REDUCING_GAP = 1.0


def cut_down(rgb: np.ndarray, scale: float) -> np.ndarray:
    """rgb made `scale` times as large (< 1), as the detector is handed it."""
    return _smaller(rgb, scale)


def _smaller(rgb: np.ndarray, scale: float, reduce: bool = True) -> np.ndarray:
    """rgb made `scale` times as large (< 1): reduced by a whole factor, then bilinear
    (REDUCING_GAP), or bilinear all the way (`reduce` False)."""
    h, w = rgb.shape[:2]
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR,
        reducing_gap=REDUCING_GAP if reduce else None))


def _starts(length: int, side: int, step: int) -> List[int]:
    if length <= side:
        return [0]
    starts = list(range(0, length - side, step))
    return starts + [length - side]


def _moved(face: Face, dx: int, dy: int) -> Face:
    x, y, w, h = face.box
    return Face((x + dx, y + dy, w, h), face.score,
                (face.landmarks + np.array([dx, dy], np.float32)).astype(np.float32))


def _distinct(faces: List[Face], iou: float = 0.4) -> List[Face]:
    """One face for each place: the most confident of those that overlap."""
    kept: List[Face] = []
    for face in sorted(faces, key=lambda f: -f.score):
        if not any(_iou(face.box, k.box) >= iou for k in kept):
            kept.append(face)
    return kept


def _iou(a: tuple, b: tuple) -> float:
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


class FaceStage:
    """One detector, one embedder and the gallery of that embedder's stored embeddings.

    `gallery` is a callable so the engine can hand over the registry's current contents
    (reloaded when the registry changes) without the stage knowing about the registry.
    """

    def __init__(self, detector: FaceDetector, embedder: FaceEmbedder,
                 gallery: Callable[[], Gallery], min_face_px: float = 32,
                 detect_size: int = DETECT_SIZE, threshold: Optional[float] = None):
        self.detector, self.embedder, self._gallery = detector, embedder, gallery
        self.min_face_px, self.detect_size = min_face_px, detect_size
        self.threshold = embedder.threshold if threshold is None else threshold

    def findings(self, rgb: np.ndarray, to_full: float = 1.0, turns: bool = False
                 ) -> List[FaceFinding]:
        """Every face of at least min_face_px (measured at full size), with its best match.
        `to_full` maps `rgb`'s pixels to the full image's (when it was decoded smaller).
        `turns`: also look for protected people in turned and inverted copies
        (turned_findings)."""
        copies = _detection_copy(self, rgb, to_full)
        faces = self.matchable(faces_in_copies(self.detector, copies), to_full)
        found = self.match(rgb, faces, to_full)
        if turns and not any(f.identity for f in found):
            found += turned_findings(self, rgb, to_full, copies, seen=faces)
        return found

    def matchable(self, faces: Sequence[Face], to_full: float = 1.0) -> List[Face]:
        """The faces large enough to match (min_face_px, measured at full size)."""
        return [f for f in faces if f.size * to_full >= self.min_face_px]

    def match(self, rgb: np.ndarray, faces: Sequence[Face], to_full: float = 1.0
              ) -> List[FaceFinding]:
        """A finding for each of `faces` (already found in `rgb`), in order, with its match."""
        if not faces:
            return []
        matches = self._gallery().match(self.embedder.embed(rgb, faces), self.threshold)
        out = []
        for face, m in zip(faces, matches):
            box = tuple(int(round(v * to_full)) for v in face.box)
            out.append(FaceFinding(box, round(face.score, 4), m.identity if m else None,
                                   m.scope if m else None, m.similarity if m else None))
        return out


# (quarter turns counter-clockwise, as np.rot90's k; colours inverted): every copy a chain of
# stock rotate and invert nodes can make, upright and natural excepted
TURNS = ((1, False), (2, False), (3, False), (0, True), (1, True), (2, True), (3, True))


def turned(rgb: np.ndarray, how) -> np.ndarray:
    k, inverted = how
    out = np.rot90(rgb, k) if k else rgb
    return 255 - out if inverted else np.ascontiguousarray(out)


def box_back(box: tuple, how, width: int, height: int) -> tuple:
    """A box (x, y, w, h) found in turned(rgb, how), in rgb's own pixels (width x height)."""
    x, y, w, h = box
    how = how[0]  # inverting colours moves nothing
    if how == 1:  # turned (x', y') came from (width - y', x')
        return (width - y - h, x, h, w)
    if how == 2:
        return (width - x - w, height - y - h, w, h)
    if how == 3:  # (x', y') came from (y', height - x')
        return (y, height - x - w, h, w)
    return box


PREPASS_SIZE = 320  # the turned copies are first searched for faces this small
CLEAN_SIZE = 1024  # cleaned and tilted copies are made of a copy at most this large
# Copies that undo what a picture was given to slip past matching (red team, round 2: a grid
# of 1 px lines, scan lines, noise, salt and pepper, heavy JPEG, a 45 degree tilt; measured on
# the astronaut: 0.03-0.33 cosine as given, 0.73-0.92 cleaned or tilted back)
CLEANED = ("median", "blur", "tilt+45", "tilt-45", "taller", "wider")
STRETCH = {"taller": (1, 2), "wider": (2, 1)}  # a picture squashed by half, stretched back
TILTS = {"tilt+45": 45.0, "tilt-45": -45.0}  # degrees, counter-clockwise (Pillow's rotate)
SEARCH_WORKERS = 4  # copies searched at once, at most (search_workers)


def view_of(rgb: np.ndarray, how, scale: float = 1.0) -> np.ndarray:
    """A turned (TURNS) or cleaned (CLEANED) copy; `scale`: how much smaller rgb is than the
    picture the copy stands for (filters are sized to it)."""
    if isinstance(how, tuple):
        return turned(rgb, how)
    if how == "median":  # Pillow's MedianFilter, pixel for pixel, faster (median.py)
        return median_filter(rgb, 5 if scale > 0.5 else 3)
    img = Image.fromarray(np.ascontiguousarray(rgb))
    if how == "blur":
        return np.asarray(img.filter(ImageFilter.GaussianBlur(max(0.6, 1.5 * scale))))
    if how in STRETCH:
        fx, fy = STRETCH[how]
        h, w = rgb.shape[:2]
        return np.asarray(img.resize((w * fx, h * fy), Image.Resampling.BILINEAR))
    return np.asarray(img.rotate(TILTS[how], resample=Image.Resampling.BILINEAR, expand=True,
                                 fillcolor=(128, 128, 128)))


def prepass_side(rgb: np.ndarray, min_face: float) -> int:
    """The long side of the second cheap pass, made of a copy whose first one (PREPASS_SIZE)
    finds no face: large enough that a face of `min_face` px (the smallest one matched, in
    rgb's pixels) is MIN_DETECTED px there (PREPASS_SIZE when that is enough: no second pass).
    At 320 px alone such a face in a picture over 1024 px was missed by every cheap pass, so
    no turned or tilted copy of it was searched (a 50 px face turned 90 degrees in a 1600 px
    picture was found in 20 of 49 red-team probes). The second pass does not replace the
    first: at 781 px a 2500 px picture under a grid of 1 px lines every 24 px hid its face
    from the cheap pass, which the 320 px copy (the grid washed out) found."""
    side = max(rgb.shape[:2])
    return max(PREPASS_SIZE, min(side, int(np.ceil(side * MIN_DETECTED / max(min_face, 1.0)))))


def _shrunk(rgb: np.ndarray, side: int, reduce: bool = True) -> Tuple[np.ndarray, float]:
    h, w = rgb.shape[:2]
    f = side / max(h, w)
    if f >= 1.0:
        return rgb, 1.0
    return _smaller(rgb, f, reduce), f


def turned_findings(stage: "FaceStage", rgb: np.ndarray, to_full: float = 1.0,
                    copies: Optional[List[Tuple[np.ndarray, float]]] = None,
                    seen: Sequence[Face] = ()) -> List[FaceFinding]:
    """Protected people in copies of `rgb` that undo what a picture may have been given to
    slip past matching: turned 90, 180 or 270 degrees, with inverted colours, or both (TURNS:
    what a chain of stock rotate and invert nodes turns back), and cleaned or tilted
    (CLEANED: a median filter against lines and salt and pepper, a blur against noise and
    heavy JPEG, 45 degree tilts, a picture squashed to half its height or width stretched
    back). A face detector and the embedder's alignment only work on
    clean faces near upright, in natural colours. Each copy is first searched for faces at
    PREPASS_SIZE (the cheap pass; in a picture over 1024 px, a copy where that finds nothing
    gets a second, larger one: prepass_side); only a copy where one finds a face is searched
    at the usual size, and its faces embedded and matched. Returns the findings that match someone in the
    first copy (in TURNS + CLEANED order) where anyone matches, boxes in `rgb`'s pixels (times
    `to_full`); a tilted copy's finding gets the whole picture.

    A turned copy is not made at full size for its search: the picture is cut down to
    detection size once (and for a large picture once more, to the finer copy:
    detection_copies) and those copies turned (_detection_copy), and its faces are embedded
    from a view of the picture turned (turned_view), instead of a full-size turn, copy and
    resize per turned copy: what that saves grows with the picture (bench/face_search.py;
    the matches on its red-team probes are the same). `copies`: those copies, when the
    caller made them for the upright detection (FaceStage.findings), so they are not made
    twice; they must be _detection_copy(stage, rgb, to_full)'s.

    The copies are searched side by side (in_order): the result is the one a search of one
    copy after the other gives, sooner, since the time goes to Pillow's filters and
    onnxruntime, which release the GIL (measured on 2 busy cores: 0.83-0.88x; more cores gain
    more, up to SEARCH_WORKERS copies at once).

    `seen`: the faces the upright search found in `rgb` (its pixels), embedded and matched to
    nobody. A copy that turns, tilts, stretches or inverts the picture (not one that filters
    its pixels) does not embed a face it finds at the place and size of one of them when the
    detector is less sure of it there (by DOMINANCE_MARGIN), or when, in a stretched or
    tilted copy, the upright face has the more usual proportions or the more level eyes
    (_less_natural): that is a face already read better upright (dominated); when its cheap
    pass finds only faces that the picture's own cheap pass read better, it is not searched
    at full size either (the two passes compared at the same scale). On a benign photo most
    such copies find only that misreading (bench/face_search.py part 3: 11.5 faces embedded a
    searched photo with no such rule, 4.8 with the score alone); when an attacker turned,
    tilted, squashed or inverted the face, the copy that undoes it reads the face better than
    the upright search does, so it is still embedded (the same bench's red team: no match
    lost on any of its transforms)."""
    sides = [PREPASS_SIZE, prepass_side(rgb, stage.min_face_px / to_full)]
    passes = [_CheapPass(stage, rgb, side, seen) for side in sorted(set(sides))]
    cleaned_base = _Once(lambda: _shrunk(rgb, CLEAN_SIZE, reduce=False))  # REDUCING_GAP
    detect_base = _Once(lambda: copies if copies is not None
                        else _detection_copy(stage, rgb, to_full))
    with closing(in_order(lambda how: _copy_hits(stage, rgb, to_full, how, passes,
                                                 cleaned_base, detect_base, seen),
                          TURNS + CLEANED)) as results:
        for hits in results:
            if hits:
                return hits
    return []


def _copy_hits(stage: "FaceStage", rgb: np.ndarray, to_full: float, how,
               passes: Sequence["_CheapPass"], cleaned_base: "_Once",
               detect_base: Optional["_Once"] = None, seen: Sequence[Face] = ()
               ) -> List[FaceFinding]:
    """turned_findings for one copy (`how`): the findings in it that match someone.
    `detect_base`: rgb cut down to detection size once (_detection_copy), for turned copies.
    `seen`: the upright search's faces (turned_findings): the ones they dominate are not
    embedded. `passes`: the cheap passes, smallest first (_CheapPass); the copy is searched
    further only when one finds a face that, in a geometric copy, the upright ones do not
    dominate at that scale (_CheapPass.seen). A pass that finds only dominated faces goes on
    to the next: a small face turned beside a large upright one is seen only in the larger
    pass."""
    for cheap_pass in passes:
        small, f = cheap_pass.copy()
        prepass = np.ascontiguousarray(view_of(small, how, f))
        cheap = stage.detector.detect(prepass)
        if cheap and not (seen and _comparable(how) and all(
                _dominated(face, in_picture(face, how, small.shape[1], small.shape[0],
                                            prepass.shape[:2], small.shape[:2], 1.0),
                           cheap_pass.seen(), how) for face in cheap)):
            break  # a face the upright search did not read better: search this copy
    else:  # nothing new in any pass (the larger one may see a small face beside a big one)
        return []
    h, w = rgb.shape[:2]
    if isinstance(how, tuple):  # turned: a view of rgb; its colours inverted only when a
        copy, scale = turned_view(rgb, (how[0], False)), to_full  # face is embedded (below)
        faces = _turned_faces(stage, rgb, how, to_full, detect_base)
    else:
        base, g = cleaned_base()
        copy, scale = view_of(base, how, g), to_full / g
        faces = detect_faces(stage.detector, copy, stage.detect_size,
                             stage.min_face_px / scale)
    faces = stage.matchable(faces, scale)
    if seen and _comparable(how):
        base_shape = cleaned_base()[0].shape[:2] if how in TILTS else None
        faces = [face for face in faces if not _dominated(face, in_picture(
            face, how, w, h, copy.shape[:2], base_shape, to_full / scale), seen, how)]
    if isinstance(how, tuple) and how[1] and faces:
        copy = turned_view(rgb, how)  # the inverted picture, made at full size
    hits: List[FaceFinding] = []
    for face, finding in zip(faces, stage.match(copy, faces, scale)):
        if not finding.identity:
            continue
        if isinstance(how, tuple):
            box = box_back(face.box, how, w, h)
        elif how in ("median", "blur"):
            box = tuple(v / g for v in face.box)
        elif how in STRETCH:
            fx, fy = STRETCH[how]
            bx, by, bw, bh = face.box
            box = (bx / fx / g, by / fy / g, bw / fx / g, bh / fy / g)
        else:
            box = (0, 0, w, h)
        hits.append(dataclasses.replace(
            finding, box=tuple(int(round(v * to_full)) for v in box)))
    return hits


DOMINANCE_MARGIN = 0.02  # how much less sure of a face the detector must be in a copy


class _CheapPass:
    """One cheap pass of the search: the picture cut down to `side` px (made on first use)
    and the upright search's faces as the detector finds them there (_small_seen)."""

    def __init__(self, stage: "FaceStage", rgb: np.ndarray, side: int, seen: Sequence[Face]):
        self.copy = _Once(lambda: _shrunk(rgb, side))
        self.seen = _Once(lambda: _small_seen(stage, *self.copy(), seen))


def _small_seen(stage: "FaceStage", small: np.ndarray, f: float, seen: Sequence[Face]
                ) -> List[Face]:
    """The faces the cheap pass finds in `small` (the picture cut down by `f`) upright that
    are one of `seen` (the upright search's faces, in the picture's pixels): the cheap passes
    of the geometric copies are compared with these, at the same scale."""
    if not seen:
        return []
    out = []
    for face in stage.detector.detect(np.ascontiguousarray(small)):
        x, y, w, h = (v / f for v in face.box)
        if any(_same_place((x + w / 2, y + h / 2, min(w, h)), other) for other in seen):
            out.append(face)
    return out


def _comparable(how) -> bool:
    """A copy whose faces are compared with the upright ones (_dominated): one that moves the
    picture's pixels (turned, tilted, stretched) or inverts them, as opposed to one that
    filters them. A median or blur can make a face embed better without the detector reading
    it better (noise, a grid of lines), so their faces are always embedded."""
    return isinstance(how, tuple) or how in TILTS or how in STRETCH


def in_picture(face: Face, how, width: int, height: int, copy_shape: Tuple[int, int],
               base_shape: Optional[Tuple[int, int]], g: float) -> Tuple[float, float, float]:
    """(centre x, centre y, size) in the picture's pixels (width x height) of a face found in
    copy `how` (its pixels: copy_shape). `g`: the copy's pixels per picture pixel (1 for a
    turned copy, which is made at full size; the cleaned base's scale for the others);
    `base_shape`: the cleaned base a tilted copy was turned from (PIL's rotate with expand,
    about the centre)."""
    x, y, w, h = face.box
    cx, cy, size = x + w / 2, y + h / 2, min(w, h)
    if isinstance(how, tuple):
        k = how[0]
        cx, cy = {1: (width - cy, cx), 2: (width - cx, height - cy),
                  3: (cy, height - cx)}.get(k, (cx, cy))
        return cx, cy, size
    if how in STRETCH:
        fx, fy = STRETCH[how]
        return cx / fx / g, cy / fy / g, min(w / fx, h / fy) / g
    if how in TILTS:
        t = np.radians(TILTS[how])
        dx, dy = cx - copy_shape[1] / 2, cy - copy_shape[0] / 2
        bx = np.cos(t) * dx - np.sin(t) * dy + base_shape[1] / 2
        by = np.sin(t) * dx + np.cos(t) * dy + base_shape[0] / 2
        return float(bx) / g, float(by) / g, size / g
    return cx / g, cy / g, size / g


def _dominated(face: Face, where: Tuple[float, float, float], seen: Sequence[Face],
               how=None) -> bool:
    """Whether one of `seen` (the upright search's faces, embedded, matched to nobody) is at
    `where` (the face's centre and size in the picture: within a quarter of its size, the
    sizes within 1.5x of each other) and reads as the more natural face: a detection score
    above the face's by DOMINANCE_MARGIN, or, in a stretched or tilted copy `how`, a face of
    more usual proportions or more level eyes (_less_natural): the same face, read worse."""
    return any(_same_place(where, other) and (face.score < other.score - DOMINANCE_MARGIN
                                              or _less_natural(face, other, how))
               for other in seen)


# A face's width between the eyes over the height from eyes to mouth, as the embedder's
# alignment template has it (ARCFACE_DST: 35.2 / 40.7); a face squashed to half its height
# reads twice that, and stretched back, the usual value again.
USUAL_PROPORTION = 0.866
PROPORTION_MARGIN = float(np.log(1.25))  # how much further from it a stretched copy must be
ROLL_MARGIN = 20.0  # degrees: how much less level a tilted copy's eyes must be


def _less_natural(face: Face, upright: Face, how) -> bool:
    """Whether `face`, found in the stretched or tilted copy `how`, looks less like a face as
    faces are than `upright`, the same face found upright (each measured in its own copy's
    pixels, on its five landmarks). A stretched copy undoes a picture squashed to half its
    height or width: when the upright face has the more usual proportions, nothing was
    squashed, and the copy's face is that face pulled out of shape (a benign photo's face
    stretched twice as wide reads as surely, 0.92-0.95, as upright). A tilted copy undoes a
    face tilted 45 degrees: when the upright face's eyes are the more level, it was not, and
    alignment (which turns the eyes level) gets no more from the copy than from upright. An
    attacker's squashed or tilted face is the other way round: the copy's is the usual one."""
    if how in STRETCH:
        return _off_proportion(face) > _off_proportion(upright) + PROPORTION_MARGIN
    if how in TILTS:
        return abs(_roll(face)) > abs(_roll(upright)) + ROLL_MARGIN
    return False


def _off_proportion(face: Face) -> float:
    """How far, as |log| of the ratio, the face's eye width over eye-to-mouth height is from
    USUAL_PROPORTION (inf when the landmarks give no such height)."""
    points = np.asarray(face.landmarks, np.float64).reshape(5, 2)
    eyes = np.hypot(*(points[1] - points[0]))
    height = np.hypot(*((points[3] + points[4]) / 2 - (points[0] + points[1]) / 2))
    if eyes <= 0 or height <= 0:
        return float("inf")
    return float(abs(np.log(eyes / height / USUAL_PROPORTION)))


def _roll(face: Face) -> float:
    """The angle of the line from one eye to the other, in degrees (0: level)."""
    points = np.asarray(face.landmarks, np.float64).reshape(5, 2)
    dx, dy = points[1] - points[0]
    return float(np.degrees(np.arctan2(dy, dx)))


def _same_place(where: Tuple[float, float, float], other: Face) -> bool:
    """Whether a face at `where` (centre x, centre y, size) is `other`: centres within a
    quarter of its size, sizes within 1.5x of each other."""
    cx, cy, size = where
    ox, oy, ow, oh = other.box
    osize = other.size
    if osize <= 0 or not (1 / 1.5 <= size / osize <= 1.5):
        return False
    return bool(np.hypot(cx - (ox + ow / 2), cy - (oy + oh / 2)) <= 0.25 * osize)


def turned_view(rgb: np.ndarray, how) -> np.ndarray:
    """turned(rgb, how) without copying the pixels when only turned (a view of rgb): the
    embedder reads a few thousand of them per face, so a copy of the whole picture (tens of
    ms at full size) buys nothing."""
    k, inverted = how
    out = np.rot90(rgb, k) if k else rgb
    return 255 - out if inverted else out


def _detection_copy(stage: "FaceStage", rgb: np.ndarray, to_full: float
                    ) -> List[Tuple[np.ndarray, float]]:
    """rgb's detection_copies, as detect_faces makes them (Pillow's bilinear resize), made
    once for all turned copies: turning or inverting them is what detect_faces would see of
    the turned copy at full size (a quarter turn and the resize commute, but for the rounding
    of Pillow's two passes: +-1 in a few pixels), at a fraction of the cost of turning and
    resizing the full picture for each. A picture no larger than detection size is its own
    copy (turned whole, as before)."""
    return detection_copies(rgb, stage.detect_size, stage.min_face_px / to_full)


def _turned_faces(stage: "FaceStage", rgb: np.ndarray, how, to_full: float,
                  detect_base: Optional["_Once"]) -> List[Face]:
    """detect_faces on turned(rgb, how), in that copy's pixels: from the shared cut-down
    copies (_detection_copy) when given, else on the turned copy itself."""
    if detect_base is None:
        return detect_faces(stage.detector, turned(rgb, how), stage.detect_size,
                            stage.min_face_px / to_full)
    return faces_in_copies(stage.detector, detect_base(), how)


class _Once:
    """A value made on first use, once, whichever thread asks first (the cleaned copies'
    shared base: only made when one of them needs it)."""

    def __init__(self, make: Callable):
        self._make, self._lock, self._value, self._made = make, threading.Lock(), None, False

    def __call__(self):
        with self._lock:
            if not self._made:
                self._value, self._made = self._make(), True
            return self._value


def search_workers() -> int:
    """How many copies are searched at once: each search runs Pillow (one core) and
    onnxruntime (its own threads), so more than a few only queue for the same cores."""
    return max(1, min(SEARCH_WORKERS, usable_cpus()))


def in_order(work: Callable, items: Sequence) -> Iterator:
    """work(item) for each item, run on a few threads, yielded in the items' order. When the
    caller stops early, the items not yet started are dropped (those running finish first),
    so stopping at the first hit gives what a plain loop would. An exception in work is
    raised here, at its item's turn."""
    pool = ThreadPoolExecutor(max_workers=search_workers(), thread_name_prefix="consent-guard")
    try:
        for future in [pool.submit(work, item) for item in items]:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def apply_identity_rules(verdict: Verdict, faces: Sequence[FaceFinding]) -> Verdict:
    """The output rule: a protected person under scope `any` is never shown; under scope
    `explicit` they are not shown in an image the explicit check censors or blocks."""
    explicit = verdict.decision is not Decision.ALLOW
    hits = [f for f in faces if f.identity and (f.scope == "any" or explicit)]
    if not hits:
        return _with_faces(verdict, faces)
    reasons = verdict.reasons + tuple(_reason(f) for f in hits)
    rule = ("protected identity: " + "; ".join(sorted({_why(f) for f in hits}))
            + (f"; {verdict.rule}" if verdict.rule else ""))
    return dataclasses.replace(verdict, decision=Decision.BLOCK, reasons=reasons, regions=(),
                               rule=rule, faces=tuple(faces))


def input_rules(faces: Sequence[FaceFinding]) -> Verdict:
    """The input rule: a photo of someone protected under scope `any` may not be a source for
    img2img, inpainting or face swap. Scope `explicit` does not restrict inputs."""
    hits = [f for f in faces if f.identity and f.scope == "any"]
    if not hits:
        return Verdict(Decision.ALLOW, rule="no protected identity (scope any) in the input",
                       faces=tuple(faces))
    return Verdict(Decision.BLOCK, tuple(_reason(f) for f in hits), (),
                   "protected identity: this person's photos may not be used as a source "
                   "(scope any)", faces=tuple(faces))


def _reason(f: FaceFinding) -> Reason:
    return Reason("face_match", f.identity or "", float(f.similarity or 0.0),
                  "protected_identity", Decision.BLOCK, f.box)


def _why(f: FaceFinding) -> str:
    if f.scope == "any":
        return "no image of this person may be generated (scope any)"
    return "no explicit image of this person may be generated (scope explicit)"


def _with_faces(verdict: Verdict, faces: Sequence[FaceFinding]) -> Verdict:
    return dataclasses.replace(verdict, faces=tuple(faces)) if faces else verdict


__all__ = ["FaceStage", "detect_faces", "apply_identity_rules", "input_rules"]
