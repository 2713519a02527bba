"""A rotated or inverted picture of a protected person is still theirs: the identity check
looks at turned copies too (consent_guard/faces/stage.py turned_findings). The fake face
double finds people by the image's top-left pixel, so a key placed in another corner is
seen only in the copy that turns that corner to the top left."""
import numpy as np
import pytest

from consent_guard import Engine, Policy
from consent_guard.faces.backends import FaceBackend
from consent_guard.faces.stage import CLEANED, TURNS, box_back, turned
from consent_guard.registry import Consent, Registry
from consent_guard.verdict import Decision

from conftest import FakeFaces, FakeParts, FakeScorer

PASS = "turned faces passphrase"
ALICE_UPSIDE_DOWN, ALICE_INVERTED, STRANGER = 20, 21, 22


@pytest.fixture
def registry(tmp_path):
    reg = Registry.create(tmp_path / "identities.db", PASS)
    reg.add("Alice", "any", Consent("Alice"), {"fake-000000000001": FakeFaces.vector("alice")[None]})
    yield reg
    reg.close()


def picture(top_left=0, bottom_right=0):
    rgb = np.full((96, 128, 3), 128, np.uint8)
    rgb[0, 0, 0], rgb[-1, -1, 0] = top_left, bottom_right
    return rgb


def engine(registry, faces):
    return Engine(Policy(), parts=FakeParts(), scorer=FakeScorer(), registry=registry,
                  face_backend=FaceBackend("fake", faces, faces))


@pytest.mark.parametrize("how", TURNS)
def test_boxes_found_in_a_turned_copy_map_back(how):
    rgb = np.zeros((60, 100, 3), np.uint8)
    x, y, w, h = 7, 11, 30, 20
    rgb[y:y + h, x:x + w] = 255
    copy = turned(rgb, how)
    if how[1]:  # inverted: the mark is where the copy is dark
        copy = 255 - copy
    rows, cols = np.nonzero(copy[..., 0])
    found = (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
    assert box_back(found, how, 100, 60) == (x, y, w, h)


def test_a_protected_person_upside_down_is_blocked(registry):
    faces = FakeFaces({ALICE_UPSIDE_DOWN: ["alice"]})
    e = engine(registry, faces)
    upright_only = FakeFaces({0: []})
    assert upright_only.detect(picture(0, ALICE_UPSIDE_DOWN)) == []  # upright: nobody
    v = e.check_image(picture(0, ALICE_UPSIDE_DOWN))
    assert v.decision is Decision.BLOCK
    assert [r.category for r in v.reasons] == ["protected_identity"]
    x, y, w, h = v.faces[-1].box  # reported where it is in the picture as given
    assert (x + w, y + h) == (128, 96)
    assert e.check_input_image(picture(0, ALICE_UPSIDE_DOWN)).decision is Decision.BLOCK


def test_a_protected_person_in_inverted_colours_is_blocked(registry):
    e = engine(registry, FakeFaces({ALICE_INVERTED: ["alice"]}))
    assert e.check_image(picture(255 - ALICE_INVERTED)).decision is Decision.BLOCK
    # turned upside down and inverted: the key sits bottom right, inverted
    assert e.check_image(picture(0, 255 - ALICE_INVERTED)).decision is Decision.BLOCK


def test_copies_without_faces_cost_one_small_detection_each(registry):
    """The cheap pass: a copy where no face is found is neither searched at full size nor
    embedded."""
    sizes = []

    class Sizes(FakeFaces):
        def detect(self, rgb):
            sizes.append(max(rgb.shape[:2]))
            return super().detect(rgb)

    rgb = np.full((1000, 800, 3), 128, np.uint8)
    rgb[:50, :50, 0] = STRANGER  # a block: the key survives the detector's downscaling
    faces = Sizes({STRANGER: ["stranger"]})
    v = engine(registry, faces).check_image(rgb)
    assert v.decision is Decision.ALLOW
    # the upright stranger, and the median, blurred and stretched copies (which keep the
    # key): each a first pass, then a full search; the turned and tilted copies move the key,
    # so their first pass finds nobody and nothing more is done with them. The stretched
    # copies' first pass finds a face, so the picture's own first pass is made once too (to
    # compare them with: stage._small_seen), and the double's equal scores keep them searched
    kept = ("median", "blur", "taller", "wider")
    assert faces.embedded == 1 + len(kept)
    assert len(sizes) == 1 + len(TURNS) + len(CLEANED) + 1 + len(kept)


class DarkBlock:
    """A detector double that finds the dark block, when it is at least 10 px in the image
    it is handed (as a real detector misses faces that small)."""

    def detect(self, rgb):
        from consent_guard.faces.base import Face

        ys, xs = np.nonzero(np.asarray(rgb)[..., 0] < 64)
        if len(xs) == 0 or min(np.ptp(xs), np.ptp(ys)) + 1 < 10:
            return []
        x, y, w, h = xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1
        return [Face((float(x), float(y), float(w), float(h)), 0.9,
                     np.tile(np.array([[x + w / 2, y + h / 2]], np.float32), (5, 1)))]


def test_a_face_too_small_in_the_detectors_copy_of_a_long_strip_is_found_in_tiles():
    from consent_guard.faces.stage import detect_faces

    strip = np.full((512, 16384, 3), 128, np.uint8)
    strip[100:300, 8000:8200] = 0  # 200 px: 8 px in the 640 px copy of the whole strip
    assert detect_faces(DarkBlock(), strip, 640, tiles=False) == []
    (face,) = detect_faces(DarkBlock(), strip, 640)
    x, y, w, h = face.box
    assert abs(x - 8000) < 8 and abs(y - 100) < 8 and abs(w - 200) < 12 and abs(h - 200) < 12
