"""The turned, tilted and stretched copies of the face search do not embed a face the upright
search already read better (consent_guard/faces/stage.py: _dominated, in_picture), and a
face an attacker turned or tilted is still found by the copy that undoes it.

The double reads the pixels: a "face" is a red disk with a green dot (its forehead); the
detector's score is higher the nearer the dot is to the top of the disk, as a real detector is
surer of an upright face, its landmarks turn with the dot and stretch with the disk, and the
embedder gives the person's vector (chosen by the disk's blue value) only when the dot is on
top and the disk round: a misread, sideways or squashed face embeds as nobody."""
import numpy as np
import pytest
from PIL import Image

from consent_guard import Engine, Policy
from consent_guard.faces.backends import FaceBackend
from consent_guard.faces.base import Face
from consent_guard.faces.stage import (CLEANED, DOMINANCE_MARGIN, PREPASS_SIZE, STRETCH, TILTS,
                                       TURNS, FaceStage, _dominated, in_picture, prepass_side,
                                       turned_findings, view_of)
from consent_guard.faces.matching import Gallery
from consent_guard.registry import Consent, Registry
from consent_guard.verdict import Decision

from conftest import FakeParts, FakeScorer

ALICE, STRANGER = 200, 90  # the disk's blue value


class DiskFaces:
    """FaceDetector and FaceEmbedder double (see the module docstring)."""

    name = "disk_faces"
    dim = 16
    threshold = 0.5
    model_id = "disk-000000000001"

    def __init__(self):
        self.embedded = []  # the upness of every face embedded

    @staticmethod
    def vector(blue: int) -> np.ndarray:
        v = np.random.default_rng(blue).standard_normal(16).astype(np.float32)
        return v / np.linalg.norm(v)

    @staticmethod
    def _read(rgb, box=None):
        """(box, upness, blue) of the disk in rgb (within `box` when given), or None."""
        x0 = y0 = 0
        if box is not None:
            x, y, w, h = (int(round(v)) for v in box)
            x0, y0 = max(0, x), max(0, y)
            rgb = rgb[y0:max(y0, y + h), x0:max(x0, x + w)]
        red = (rgb[..., 0] > 160) & (rgb[..., 1] < 100)
        green = (rgb[..., 1] > 160) & (rgb[..., 0] < 100)
        if red.sum() < 300:  # the disk (20 px and up), not an inverted copy's dot
            return None
        ys, xs = np.nonzero(red | green)
        cx, cy = xs.mean(), ys.mean()
        gy, gx = np.nonzero(green)
        upness, up = 0.0, np.array([0.0, -1.0])
        if len(gy):
            dx, dy = gx.mean() - cx, gy.mean() - cy
            up = np.array([dx, dy]) / max(np.hypot(dx, dy), 1e-6)
            upness = float(-up[1])
        blue = int(np.median(rgb[..., 2][red]))
        box = (x0 + xs.min(), y0 + ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        return tuple(float(v) for v in box), upness, blue, up

    # the five landmarks across and down a face, as fractions of its width and height (the
    # eyes as far apart as they are above the mouth times 0.866, as the alignment template)
    LANDMARKS = np.array([[-0.2, -0.15], [0.2, -0.15], [0.0, 0.1], [-0.15, 0.31], [0.15, 0.31]])

    def detect(self, rgb):
        found = self._read(np.asarray(rgb))
        if found is None:
            return []
        (x, y, w, h), upness, _, up = found
        across, down = np.array([-up[1], up[0]]), -up  # the face's own axes, turned with it
        points = [(x + w / 2, y + h / 2) + fx * w * across + fy * h * down
                  for fx, fy in self.LANDMARKS]
        return [Face((x, y, w, h), 0.6 + 0.35 * max(0.0, upness),
                     np.array(points, np.float32))]

    def embed(self, rgb, faces):
        out = []
        for face in faces:
            found = self._read(np.asarray(rgb), face.box)
            upness, blue, box = (found[1], found[2], found[0]) if found else (0.0, 0, (0, 0, 1, 1))
            self.embedded.append(upness)
            round_ = 0.8 <= box[2] / box[3] <= 1.25
            out.append(self.vector(blue if upness > 0.9 and round_ else 1))
        return np.array(out, np.float32).reshape(len(faces), self.dim)


def picture(blue: int, size=(240, 320)) -> np.ndarray:
    """A grey picture with one upright disk face of 80 px (the dot on top)."""
    h, w = size
    rgb = np.full((h, w, 3), 128, np.uint8)
    cy, cx = h // 2, w // 2 + 20
    ys, xs = np.mgrid[cy - 50:cy + 50, cx - 50:cx + 50]
    patch = rgb[cy - 50:cy + 50, cx - 50:cx + 50]
    patch[(ys - cy) ** 2 + (xs - cx) ** 2 <= 40 ** 2] = (230, 20, blue)
    patch[(ys - (cy - 26)) ** 2 + (xs - cx) ** 2 <= 7 ** 2] = (20, 230, blue)
    return rgb


def stage_for(faces: DiskFaces, enrolled=(ALICE,)) -> FaceStage:
    vectors = np.stack([faces.vector(b) for b in enrolled])
    gallery = Gallery(faces.model_id, vectors, np.arange(len(enrolled)),
                      [(f"person {b}", "any") for b in enrolled])
    return FaceStage(faces, faces, lambda: gallery, min_face_px=32)


def upright(stage: FaceStage, rgb) -> list:
    return stage.matchable(stage.detector.detect(rgb))


def assert_found_only_by_the_search(rgb, faces=None) -> None:
    """An attacked picture of Alice: the upright search finds a face but matches nobody (a
    misreading), and the search of the copies finds her."""
    stage = stage_for(faces or DiskFaces())
    seen = upright(stage, rgb)
    assert seen and not any(m.identity for m in stage.match(rgb, seen))
    assert [h.identity for h in turned_findings(stage, rgb, seen=seen)] == [f"person {ALICE}"]


def test_the_double_reads_an_upright_disk_surer_than_a_turned_one():
    faces = DiskFaces()
    up = faces.detect(picture(STRANGER))[0]
    side = faces.detect(np.rot90(picture(STRANGER)))[0]
    assert up.score == pytest.approx(0.95, abs=0.01) and side.score < up.score - 0.2


# -- where a copy's face lies in the picture -----------------------------------------------
@pytest.mark.parametrize("how", [t for t in TURNS if not t[1]] + list(TILTS) + list(STRETCH))
def test_a_face_found_in_a_copy_maps_back_to_its_place(how):
    rgb = picture(STRANGER)
    (x, y, w, h), _, _, _ = DiskFaces._read(rgb)
    g = 0.5 if not isinstance(how, tuple) else 1.0  # cleaned copies are made of a smaller base
    base = rgb if g == 1.0 else np.asarray(Image.fromarray(rgb).resize(
        (rgb.shape[1] // 2, rgb.shape[0] // 2), Image.Resampling.BILINEAR))
    copy = view_of(base, how, g)
    found = DiskFaces().detect(copy)[0]
    cx, cy, size = in_picture(found, how, rgb.shape[1], rgb.shape[0], copy.shape[:2],
                              base.shape[:2], g)
    assert abs(cx - (x + w / 2)) <= 3 and abs(cy - (y + h / 2)) <= 3
    assert 0.8 * min(w, h) <= size <= 1.25 * min(w, h)


# -- the rule --------------------------------------------------------------------------------
def face(x, y, side, score):
    return Face((x, y, side, side), score, np.zeros((5, 2), np.float32))


def test_dominated_needs_the_same_place_a_like_size_and_a_lower_score():
    seen = [face(100, 100, 80, 0.95)]
    here = (140.0, 140.0, 80.0)
    assert _dominated(face(0, 0, 80, 0.80), here, seen)
    assert not _dominated(face(0, 0, 80, 0.95 - DOMINANCE_MARGIN / 2), here, seen)  # a tie
    assert not _dominated(face(0, 0, 80, 0.99), here, seen)  # read better: embedded
    assert not _dominated(face(0, 0, 80, 0.80), (140.0 + 25, 140.0, 80.0), seen)  # elsewhere
    assert not _dominated(face(0, 0, 80, 0.80), (140.0, 140.0, 130.0), seen)  # other size
    assert not _dominated(face(0, 0, 80, 0.80), here, [])


# -- the search ----------------------------------------------------------------------------
def test_a_benign_upright_face_is_not_embedded_again_in_turned_or_tilted_copies():
    faces = DiskFaces()
    stage = stage_for(faces)
    rgb = picture(STRANGER)
    seen = upright(stage, rgb)
    assert turned_findings(stage, rgb, seen=()) == []
    before = list(faces.embedded)
    faces.embedded.clear()
    assert turned_findings(stage, rgb, seen=seen) == []
    after = list(faces.embedded)
    # without `seen` the misread sideways and tilted disks were embedded; now they are not
    assert sum(u < 0.9 for u in before) >= 4
    assert sum(u < 0.9 for u in after) == 0
    assert len(after) < len(before)


@pytest.mark.parametrize("turn", [1, 2, 3])
def test_a_protected_face_turned_by_an_attacker_is_still_found(turn):
    assert_found_only_by_the_search(np.ascontiguousarray(np.rot90(picture(ALICE), turn)))


@pytest.mark.parametrize("angle", [45, -45])
def test_a_protected_face_tilted_by_an_attacker_is_still_found(angle):
    assert_found_only_by_the_search(np.asarray(Image.fromarray(picture(ALICE)).rotate(
        angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(128, 128, 128))))


@pytest.fixture
def registry(tmp_path):
    reg = Registry.create(tmp_path / "identities.db", "dominance passphrase")
    reg.add("Alice", "any", Consent("Alice"), {DiskFaces.model_id: DiskFaces.vector(ALICE)[None]})
    yield reg
    reg.close()


def test_the_engine_hands_the_upright_faces_to_the_search(registry):
    faces = DiskFaces()
    engine = Engine(Policy(), parts=FakeParts(), scorer=FakeScorer(), registry=registry,
                    face_backend=FaceBackend("disk", faces, faces))
    assert engine.check_image(picture(STRANGER)).decision is Decision.ALLOW
    assert faces.embedded and sum(u < 0.9 for u in faces.embedded) == 0
    upside_down = np.ascontiguousarray(np.rot90(picture(ALICE), 2))
    assert engine.check_image(upside_down).decision is Decision.BLOCK


def test_a_turned_or_tilted_copy_whose_cheap_pass_finds_only_the_misread_is_not_searched():
    """The cheap pass (PREPASS_SIZE) of a geometric copy that finds only faces the upright
    cheap pass read better ends that copy's search: no full-size detection of it."""
    faces = DiskFaces()
    stage = stage_for(faces)
    rgb = picture(STRANGER, size=(480, 640))
    shapes = []
    detect = faces.detect

    def counted(img):
        shapes.append(img.shape[:2])
        return detect(img)

    faces.detect = counted
    seen = upright(stage, rgb)
    turned_full, tilted_full = (640, 480), (640, 640)  # a turned copy; a tilted one, cut down
    for given, searched in (((), True), (seen, False)):
        shapes.clear()
        assert turned_findings(stage, rgb, seen=given) == []
        assert (turned_full in shapes) is searched and (tilted_full in shapes) is searched
    assert (480, 640) in shapes  # the copies that filter the picture are still searched


def test_a_face_turned_by_an_attacker_is_searched_past_the_cheap_pass():
    assert_found_only_by_the_search(
        np.ascontiguousarray(np.rot90(picture(ALICE, size=(480, 640)), 1)))


def test_the_cheap_pass_of_a_large_picture_keeps_a_face_of_the_smallest_matched_size():
    assert prepass_side(np.zeros((768, 1024, 3), np.uint8), 32) == PREPASS_SIZE
    assert prepass_side(np.zeros((200, 300, 3), np.uint8), 32) == PREPASS_SIZE
    side = prepass_side(np.zeros((1600, 3200, 3), np.uint8), 32)
    assert side == 1000  # a 32 px face is MIN_DETECTED px there
    assert prepass_side(np.zeros((100, 5000, 3), np.uint8), 4) == 5000  # never larger


def test_a_small_face_turned_in_a_large_picture_is_found():
    """An 80 px face in a 3000 px picture is 8.5 px at 320 px, below what the detector finds:
    the cheap pass of every turned copy missed it, so none was searched."""
    assert_found_only_by_the_search(
        np.ascontiguousarray(np.rot90(picture(ALICE, size=(3000, 3000)), 1)))


def test_the_larger_cheap_pass_runs_only_where_the_small_one_found_nothing_new(monkeypatch):
    """The 320 px pass stays first (a larger one can lose a face that downscaling cleaned up:
    a grid of 1 px lines); the larger one is made only for copies where it found nothing, or
    only faces the upright search read better."""
    from consent_guard.faces import stage as stage_module

    used = []
    made = stage_module._CheapPass.__init__

    def recording(self, stage, rgb, side, seen):
        made(self, stage, rgb, side, seen)
        copy = self.copy
        self.copy = lambda: used.append(side) or copy()

    monkeypatch.setattr(stage_module._CheapPass, "__init__", recording)
    faces = DiskFaces()
    stage = stage_for(faces)
    big = np.full((3000, 3000, 3), 128, np.uint8)
    disk = picture(STRANGER, (120, 140))[10:110, 40:140]  # the 80 px disk, cut out
    big[1000:1800, 1000:1800] = np.asarray(Image.fromarray(disk).resize(
        (800, 800), Image.Resampling.NEAREST))  # now 640 px
    larger = prepass_side(big, stage.min_face_px)
    assert larger > PREPASS_SIZE
    assert turned_findings(stage, big, seen=upright(stage, big)) == []
    # every copy's first pass at 320 px (and once more, the upright faces at that scale for
    # the geometric copies); the four inverted copies (a green disk: nothing found) and the
    # geometric ones that find only the misread or pulled-out-of-shape disk go on to the
    # larger pass (and the upright faces once more at that scale), the median and blurred
    # copies (the disk as it is, a new face for them) do not
    assert used.count(PREPASS_SIZE) == len(TURNS) + len(CLEANED) + 1
    assert used.count(larger) - 1 == len(TURNS) + len(CLEANED) - 2
    used.clear()
    small = np.ascontiguousarray(np.rot90(picture(ALICE, size=(3000, 3000)), 1))
    assert [h.identity for h in turned_findings(stage, small, seen=upright(stage, small))] \
        == [f"person {ALICE}"]
    assert larger in used


class QuadrantDisks(DiskFaces):
    """DiskFaces reading each quarter of the picture on its own (one disk in each at most)."""

    def detect(self, rgb):
        rgb = np.asarray(rgb)
        h, w = rgb.shape[:2]
        out = []
        for y in (0, h // 2):
            for x in (0, w // 2):
                for face in super().detect(rgb[y:y + h // 2, x:x + w // 2]):
                    out.append(Face((face.box[0] + x, face.box[1] + y) + face.box[2:],
                                    face.score, face.landmarks + np.float32([x, y])))
        return out


def test_a_small_turned_face_beside_a_large_upright_one_is_still_searched():
    """A decoy: a large upright face, whose misreadings fill every turned copy's 320 px pass
    (all dominated), beside a small protected face turned by an attacker, which only the
    larger pass sees."""
    faces = QuadrantDisks()
    stage = stage_for(faces)
    rgb = np.full((3000, 3000, 3), 128, np.uint8)
    disk = picture(STRANGER, (120, 140))[10:110, 40:140]
    rgb[300:1100, 300:1100] = np.asarray(Image.fromarray(disk).resize(
        (800, 800), Image.Resampling.NEAREST))  # a 640 px stranger, upright
    rgb[2200:2300, 2200:2300] = np.rot90(picture(ALICE, (120, 140))[10:110, 40:140], 1)
    seen = upright(stage, rgb)
    assert len(seen) == 2 and not any(m.identity for m in stage.match(rgb, seen))
    assert [h.identity for h in turned_findings(stage, rgb, seen=seen)] == [f"person {ALICE}"]


# -- stretched, tilted and inverted copies ---------------------------------------------------
def test_a_stretched_or_tilted_copy_is_less_natural_only_when_upright_is_the_usual_face():
    from consent_guard.faces.stage import _less_natural

    faces = DiskFaces()
    level = faces.detect(picture(STRANGER))[0]
    wide = faces.detect(view_of(picture(STRANGER), "wider"))[0]
    tall = faces.detect(view_of(picture(STRANGER), "taller"))[0]
    tilted = faces.detect(view_of(picture(STRANGER), "tilt+45"))[0]
    assert wide.score == level.score  # the score alone cannot tell them apart
    assert _less_natural(wide, level, "wider") and _less_natural(tall, level, "taller")
    assert _less_natural(tilted, level, "tilt+45")
    # an attacker's squashed or tilted face: the copy that undoes it is the usual face
    squashed = faces.detect(squashed_picture(ALICE, "height"))[0]
    assert not _less_natural(level, squashed, "taller")
    assert not _less_natural(level, tilted, "tilt-45")
    for how in [t for t in TURNS] + ["median", "blur"]:  # only stretched and tilted copies
        assert not _less_natural(wide, level, how)


def squashed_picture(blue: int, axis: str) -> np.ndarray:
    """picture(blue) squashed to half its height or width (the red team's squash)."""
    img = Image.fromarray(picture(blue))
    w, h = img.size
    size = (w, h // 2) if axis == "height" else (w // 2, h)
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR))


@pytest.mark.parametrize("axis", ["height", "width"])
def test_a_protected_face_squashed_by_an_attacker_is_still_found(axis):
    assert_found_only_by_the_search(squashed_picture(ALICE, axis))


class NegativeDisks(DiskFaces):
    """DiskFaces that also finds a disk in inverted colours (a negative: a green disk with a
    red dot), less surely, as YuNet reads a photo's negative (0.78-0.91 against 0.93-0.95),
    and embeds it as nobody."""

    def detect(self, rgb):
        found = super().detect(rgb)
        if found:
            return found
        return [Face(f.box, 0.6 + (f.score - 0.6) * 0.5, f.landmarks)
                for f in super().detect(255 - np.asarray(rgb))]


@pytest.mark.parametrize("double", [DiskFaces, NegativeDisks])
def test_a_benign_face_is_not_embedded_again_stretched_or_as_its_negative(double):
    """A benign upright face stretched twice as tall or wide reads as surely as upright (the
    double: the same score; real photos: 0.92-0.95), but pulled out of shape; its negative
    (NegativeDisks) reads less surely: only the copies that filter the picture (median,
    blur) embed it again."""
    faces = double()
    stage = stage_for(faces)
    rgb = picture(STRANGER)
    assert turned_findings(stage, rgb, seen=()) == []
    without = len(faces.embedded)
    faces.embedded.clear()
    assert turned_findings(stage, rgb, seen=upright(stage, rgb)) == []
    assert len(faces.embedded) == 2 < without  # the median and the blurred copy


@pytest.mark.parametrize("turn", [0, 1, 2, 3])
def test_a_protected_face_inverted_by_an_attacker_is_still_found(turn):
    assert_found_only_by_the_search(
        np.ascontiguousarray(255 - np.rot90(picture(ALICE), turn)), NegativeDisks())


class SurerSmallNegatives(NegativeDisks):
    """NegativeDisks whose negative reads as surely as the upright disk on a copy no larger
    than the cheap pass's (so the cheap pass sends the inverted copy on to the full search),
    and less surely on a larger one (where the upright face dominates it)."""

    def detect(self, rgb):
        found = super().detect(rgb)
        if found and max(np.asarray(rgb).shape[:2]) <= PREPASS_SIZE and \
                DiskFaces._read(np.asarray(rgb)) is None:  # a negative, on the small copy
            return [Face(f.box, 0.95, f.landmarks) for f in found]
        return found


def test_the_picture_is_inverted_at_full_size_only_for_a_face_to_embed(monkeypatch):
    """An inverted copy's faces are found on the shared cut-down copies, inverted there; the
    full-size picture is inverted only when one of them is to be embedded: not when the
    full search finds only a misread negative of a benign face (dominated), but for an
    attacker's negative."""
    import consent_guard.faces.stage as stage_module

    made = []
    real = stage_module.turned_view

    def recorded(rgb, how):
        made.append(how)
        return real(rgb, how)

    monkeypatch.setattr(stage_module, "turned_view", recorded)
    faces = SurerSmallNegatives()
    stage = stage_for(faces)
    rgb = np.full((480, 640, 3), 128, np.uint8)  # larger than the cheap pass's copy
    rgb[120:360, 160:480] = picture(STRANGER)
    assert turned_findings(stage, rgb, seen=upright(stage, rgb)) == []
    assert (0, False) in made  # the inverted copy was searched at full size ...
    assert not [how for how in made if how[1]]  # ... without inverting the picture
    made.clear()
    attacked = np.ascontiguousarray(255 - picture(ALICE))
    assert_found_only_by_the_search(attacked, NegativeDisks())
    assert (0, True) in made
