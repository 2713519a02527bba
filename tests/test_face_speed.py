"""Detection on large pictures does the work of the old tiled search with fewer resizes
(consent_guard/faces/stage.py detection_copies, faces_in_copies, fine_tiles): where a face
of the smallest size would be under 10 px in the detector's copy, the picture is cut down
once more, only so far that such a face is 10 px, and that one copy is searched (in tiles
only when it is larger than FINE_TILE), instead of each tile being cut from the full picture
and resized on its own. The turned copies' search reuses both copies.

The detector doubles see geometry (tests/test_face_search.py's coloured squares, a dark
block), so what they find moves and scales with the picture as a real detector's faces do."""
import numpy as np
import pytest

import consent_guard.faces.stage as stage_module
from consent_guard.faces.stage import (FINE_TILE, TURNS, _detection_copy, _Once,
                                       _turned_faces, detect_faces, detection_copies,
                                       fine_tiles, turned)

from test_face_search import SHADES, Recorder, Squares, face_picture, stage_of
from test_turned_faces import DarkBlock


def squares_picture(height, width, at, side):
    """A grey picture with one 'face': five squares of `side` px centred on `at`."""
    rgb = np.full((height, width, 3), 128, np.uint8)
    half = side // 2
    for r, (x, y) in zip(SHADES, at):
        rgb[y - half:y + half, x - half:x + half] = (r, 255, 0)
    return rgb


def small_face_at(x0, y0, height=2600, width=3000):
    """A picture too large for a 32 px face to survive the 640 px copy, with a face of
    five 16 px squares spread over ~80 px (5 px squares at 10/32 of its size)."""
    at = [(x0, y0), (x0 + 60, y0), (x0 + 30, y0 + 30), (x0 + 8, y0 + 60), (x0 + 52, y0 + 60)]
    return squares_picture(height, width, at, 16)


def recording(monkeypatch, name):
    """The shapes of the pictures handed to stage.<name> (cut_down, turned) from now on."""
    shapes = []
    real = getattr(stage_module, name)

    def recorded(image, *args):
        shapes.append(image.shape[:2])
        return real(image, *args)

    monkeypatch.setattr(stage_module, name, recorded)
    return shapes


def test_a_large_picture_is_cut_down_twice_not_once_per_tile(monkeypatch):
    made = recording(monkeypatch, "cut_down")
    rgb = small_face_at(2000, 1700)
    (face,) = detect_faces(Squares(), rgb, 640, 32)
    assert made == [rgb.shape[:2]] * 2  # the 640 px copy and the finer one, nothing else
    assert np.abs(face.landmarks[0] - (2000, 1700)).max() < 4  # in the picture's pixels


def test_the_finer_copy_is_where_the_smallest_face_is_ten_px():
    rgb = np.zeros((2600, 3000, 3), np.uint8)
    (coarse, s1), (fine, s2) = detection_copies(rgb, 640, 32)
    assert max(coarse.shape[:2]) == 640 and s1 == 640 / 3000
    assert s2 == 10 / 32 and fine.shape[:2] == (round(2600 * s2), round(3000 * s2))
    # a face of 64 px survives the 640 px copy at 10 px or more: no finer copy
    assert len(detection_copies(rgb, 640, 64)) == 1
    # a cheap pass (tiles=False) never makes one
    assert len(detection_copies(rgb, 640, 32, tiles=False)) == 1


def test_the_smallest_face_is_found_without_the_finer_copy_only_when_large_enough():
    """The finer copy is what finds it: without it (tiles=False) it is too small."""
    rgb = small_face_at(900, 700)
    assert detect_faces(Squares(), rgb, 640, 32, tiles=False) == []
    assert len(detect_faces(Squares(), rgb, 640, 32)) == 1


def test_a_finer_copy_larger_than_a_tile_is_searched_in_overlapping_tiles():
    """A 40 px block across a tile's edge is whole in the next tile (they overlap by a
    quarter); the part the first tile sees is one place with it (detect_faces keeps one)."""
    copy = np.full((300, 3 * FINE_TILE, 3), 128, np.uint8)
    x = FINE_TILE - 20  # straddles the first tile's right edge
    copy[100:140, x:x + 40] = 0
    detector = DarkBlock()
    sizes = []
    real = detector.detect

    def seen(rgb):
        sizes.append(max(rgb.shape[:2]))
        return real(rgb)

    detector.detect = seen
    faces = fine_tiles(detector, copy)
    assert max(sizes) <= FINE_TILE and len(sizes) >= 3
    boxes = {tuple(round(v) for v in f.box) for f in faces}
    assert (x, 100, 40, 40) in boxes  # whole in the overlap (a tile may also see a part)
    assert len(stage_module._distinct(faces)) == 1


def test_one_face_for_each_place_when_both_copies_find_it():
    """A face large enough for both copies is found in both and reported once."""
    at = [(1000, 1000), (1400, 1000), (1200, 1200), (1050, 1400), (1350, 1400)]
    rgb = squares_picture(2600, 3000, at, 60)
    faces = detect_faces(Squares(), rgb, 640, 32)
    assert len(faces) == 1


@pytest.mark.parametrize("how", TURNS)
def test_a_turned_copy_of_a_large_picture_finds_what_detect_faces_finds_in_it(how):
    """The search's turned copies use the two shared copies turned: the same face, within
    a pixel, as detect_faces finds in the full-size turned picture."""
    rgb = small_face_at(2000, 1700)
    stage = stage_of(Squares(), Recorder())
    (expected,) = detect_faces(stage.detector, turned(rgb, how), stage.detect_size)
    base = _Once(lambda: _detection_copy(stage, rgb, 1.0))
    (found,) = _turned_faces(stage, rgb, how, 1.0, base)
    assert np.abs(np.subtract(found.box, expected.box)).max() < 4
    assert np.abs(found.landmarks - expected.landmarks).max() < 4


def test_turned_copies_of_a_large_picture_never_turn_the_full_size_picture(monkeypatch):
    rgb = small_face_at(2000, 1700)
    stage = stage_of(Squares(), Recorder())
    turned_shapes = recording(monkeypatch, "turned")
    base = _Once(lambda: _detection_copy(stage, rgb, 1.0))
    for how in TURNS:
        _turned_faces(stage, rgb, how, 1.0, base)
    assert rgb.shape[:2] not in turned_shapes
    assert len(turned_shapes) == 2 * len(TURNS)  # each copy turned once per turned copy


def test_the_stage_cuts_a_picture_down_once_for_the_upright_pass_and_the_search(monkeypatch):
    """FaceStage.findings hands the upright pass's copies to the search (nobody matches, so
    every copy is searched): the full-size picture is resized once per detection copy."""
    rgb = small_face_at(2000, 1700)
    stage = stage_of(Squares(), Recorder())
    made = recording(monkeypatch, "cut_down")
    found = stage.findings(rgb, turns=True)
    assert len(found) == 1 and found[0].identity is None  # the upright face, a stranger
    assert made.count(rgb.shape[:2]) == 2  # the 640 px copy and the finer one, once each


def grid_picture(side: int = 2048, every: int = 24) -> np.ndarray:
    """Flat grey with a black line 1 px wide every `every` px each way (the red team's grid)."""
    rgb = np.full((side, side, 3), 128, np.uint8)
    rgb[::every] = 0
    rgb[:, ::every] = 0
    return rgb


def test_detection_copies_are_reduced_first_but_the_cleaned_base_is_not():
    """A picture several times the size asked for is first reduced by a whole factor (the
    bilinear kernel straight from full size is as wide as the factor: REDUCING_GAP); the
    cleaned copies' base is bilinear all the way, which washes a grid of 1 px lines out
    further, and the median and blur copies made from it are there to undo such a grid."""
    from PIL import Image

    rgb = grid_picture()
    img = Image.fromarray(rgb)
    reduced = img.resize((320, 320), Image.Resampling.BILINEAR, reducing_gap=1.0)
    assert np.array_equal(stage_module.cut_down(rgb, 320 / 2048), np.asarray(reduced))
    small, f = stage_module._shrunk(rgb, 320)
    assert f == 320 / 2048 and np.array_equal(small, np.asarray(reduced))
    base, g = stage_module._shrunk(rgb, stage_module.CLEAN_SIZE, reduce=False)
    assert g == 0.5 and np.array_equal(base, np.asarray(img.resize(
        (1024, 1024), Image.Resampling.BILINEAR)))
    boxed = np.asarray(img.resize((1024, 1024), Image.Resampling.BILINEAR, reducing_gap=1.0))
    assert base.astype(float).std() < boxed.astype(float).std()  # the lines washed out more


def test_the_search_makes_its_cleaned_base_without_a_reduce(monkeypatch):
    made = []
    real = stage_module._shrunk

    def recorded(rgb, side, reduce=True):
        made.append((side, reduce))
        return real(rgb, side, reduce)

    monkeypatch.setattr(stage_module, "_shrunk", recorded)
    stage = stage_of(Squares(), Recorder())
    assert stage_module.turned_findings(stage, face_picture()) == []  # every copy searched
    assert (stage_module.CLEAN_SIZE, False) in made
    assert all(reduce for side, reduce in made if side != stage_module.CLEAN_SIZE)
