"""The turned copies' search does the same work more cheaply (consent_guard/faces/stage.py
turned_findings): the picture is cut down to detection size once, and each turned copy's
detection runs on that copy turned (instead of turning the full picture and cutting each turn
down again); the embedder reads a turned copy's faces from a view of the picture.

The detector double here sees geometry: a "face" is five coloured squares (the landmarks, in
order), so turning the picture turns what it finds, as with a real detector."""
import numpy as np
import pytest
from PIL import Image

from consent_guard.faces.base import Face
from consent_guard.faces.stage import (FINE_TILE, TURNS, FaceStage, _detection_copy, _Once,
                                       _turned_faces, cut_down, detect_faces, turned, turned_view,
                                       turned_findings)
from consent_guard.faces.matching import Gallery

SHADES = (40, 80, 120, 160, 200)  # red of each landmark square, in landmark order


class Squares:
    """Detector double: a face is five squares of colour (r, 255, 0), r from SHADES in
    landmark order, or the same inverted; `sizes`: the long side of every image it is given."""

    name = "squares"

    def __init__(self):
        self.sizes = []

    def detect(self, rgb):
        rgb = np.asarray(rgb)
        self.sizes.append(max(rgb.shape[:2]))
        points = []
        for r in SHADES:
            natural = (rgb[..., 0] == r) & (rgb[..., 1] == 255) & (rgb[..., 2] == 0)
            inverted = (rgb[..., 0] == 255 - r) & (rgb[..., 1] == 0) & (rgb[..., 2] == 255)
            ys, xs = np.nonzero(natural | inverted)
            if len(xs) < 4:
                return []
            points.append((xs.mean(), ys.mean()))
        points = np.array(points, np.float32)
        lo, hi = points.min(axis=0) - 30, points.max(axis=0) + 30
        return [Face((float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1])),
                     0.9, points)]


class Recorder:
    """Embedder double: a stranger's vector for every face, and what it was handed."""

    model_id, dim, threshold = "fake-000000000001", 4, 0.5

    def __init__(self):
        self.seen = []

    def embed(self, rgb, faces):
        self.seen.append((np.asarray(rgb).copy(), list(faces)))
        return np.tile(np.array([0, 0, 0, 1], np.float32), (len(faces), 1))


def face_picture(height=1000, width=1300):
    """A picture larger than the detection size, with one face of 60 px squares."""
    rgb = np.full((height, width, 3), 128, np.uint8)
    at = [(500, 400), (800, 400), (650, 560), (520, 720), (780, 720)]
    for r, (x, y) in zip(SHADES, at):
        rgb[y - 30:y + 30, x - 30:x + 30] = (r, 255, 0)
    return rgb


def stage_of(detector, embedder):
    gallery = Gallery("fake-000000000001", np.array([[1, 0, 0, 0]], np.float32),
                      np.array([0]), [("alice", "any")])
    return FaceStage(detector, embedder, lambda: gallery)


@pytest.mark.parametrize("how", TURNS)
def test_turned_view_is_the_turned_copy(how):
    rgb = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert np.array_equal(turned_view(rgb, how), turned(rgb, how))


@pytest.mark.parametrize("how", TURNS)
def test_the_shared_cut_down_copy_turned_is_the_turned_copy_cut_down(how):
    """A quarter turn and Pillow's resize commute but for rounding between its passes (a
    whole-factor reduce, then bilinear in two directions): +-1, +-2 where the colours are
    inverted too (255 - x rounds the other way)."""
    rng = np.random.default_rng(2)
    rgb = np.asarray(Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
                     .resize((1300, 1000), Image.Resampling.BICUBIC))
    stage = stage_of(Squares(), Recorder())
    [(small, scale)] = _detection_copy(stage, rgb, 1.0)
    assert scale == 640 / 1300
    direct = cut_down(turned(rgb, how), scale).astype(int)
    shared = turned(small, how).astype(int)
    assert shared.shape == direct.shape
    assert np.abs(shared - direct).max() <= (2 if how[1] else 1)


@pytest.mark.parametrize("how", TURNS)
def test_faces_of_a_turned_copy_are_those_detect_faces_finds_in_it(how):
    rgb = face_picture()
    stage = stage_of(Squares(), Recorder())
    (expected,) = detect_faces(stage.detector, turned(rgb, how), stage.detect_size)
    (found,) = _turned_faces(stage, rgb, how, 1.0, _Once(lambda: _detection_copy(stage, rgb, 1.0)))
    assert np.abs(np.subtract(found.box, expected.box)).max() < 1.0
    assert np.abs(found.landmarks - expected.landmarks).max() < 1.0


def test_large_or_long_pictures_get_a_finer_shared_copy():
    """Where detect_faces would also search a finer copy (a face of the smallest size would
    be under 10 px at detection size), the shared copies include it, made once; a picture no
    larger than detection size is its own copy."""
    stage = stage_of(Squares(), Recorder())
    strip = np.zeros((512, 16384, 3), np.uint8)
    (coarse, s1), (fine, s2) = _detection_copy(stage, strip, 1.0)
    assert coarse.shape[:2] == (20, 640) and s1 == 640 / 16384
    assert fine.shape[:2] == (160, 5120) and s2 == 10 / 32
    small = np.zeros((500, 600, 3), np.uint8)
    [(same, s)] = _detection_copy(stage, small, 1.0)
    assert same is small and s == 1.0
    assert len(_detection_copy(stage, np.zeros((1000, 1300, 3), np.uint8), 1.0)) == 1


def test_the_search_cuts_the_full_picture_down_once_and_embeds_the_turned_pixels(monkeypatch):
    """Nobody matches: every copy is searched. The full-size picture is cut down for
    detection once, not once for each turned copy, and what the embedder is handed for a
    turned copy is that turned copy's pixels."""
    import consent_guard.faces.stage as stage_module

    rgb = face_picture()
    full = []
    real_cut_down = stage_module.cut_down

    def counted(image, scale):
        full.append(sorted(image.shape[:2]) == sorted(rgb.shape[:2]))
        return real_cut_down(image, scale)

    monkeypatch.setattr(stage_module, "cut_down", counted)
    detector, embedder = Squares(), Recorder()
    stage = stage_of(detector, embedder)
    assert turned_findings(stage, rgb) == []
    assert sum(full) == 1 and max(detector.sizes) <= FINE_TILE
    turned_seen = [(img, faces) for img, faces in embedder.seen if img.shape[:2] in
                   (rgb.shape[:2], rgb.shape[1::-1])]
    assert len(turned_seen) == len(TURNS)  # each turned copy finds and embeds the face
    for img, (face,) in turned_seen:
        x, y = (int(round(v)) for v in face.landmarks[0])
        assert tuple(img[y, x]) in {(40, 255, 0), (215, 0, 255)}  # on the first square
