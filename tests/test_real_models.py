"""The real models (from the pip wheels) on benign photos that packages ship, and on the
benign evaluation images when ../shared is present. Nothing explicit is ever used."""
import glob

import numpy as np
import pytest
from PIL import Image

from consent_guard import Decision, Engine, ModelError
from consent_guard.prepare import PreparedImage


@pytest.fixture(scope="module")
def engine():
    e = Engine()
    try:
        e.load()
    except ModelError as exc:
        pytest.skip(f"models not installed: {exc}")
    return e


def test_group_photo_and_portrait_are_allowed(engine, t1_jpg, astronaut_png):
    for path in (t1_jpg, astronaut_png):
        v = engine.check_file(path)
        assert v.decision is Decision.ALLOW, (path, v)
        assert v.reasons == () and v.scores["nudenet_exposed_max"] < 0.25


def test_nudenet_finds_the_faces_in_the_group_photo(engine, t1_jpg):
    """A positive path of the real detector on a benign image: the plumbing (preprocessing,
    box scaling to original pixels, NMS) works if it finds the six faces where they are."""
    rgb = np.asarray(Image.open(t1_jpg).convert("RGB"))
    dets = engine._parts.detect([PreparedImage(rgb)])[0]
    faces = [d for d in dets if d.label.startswith("FACE_") and d.score >= 0.25]
    assert len(faces) >= 5
    h, w = rgb.shape[:2]
    for d in faces:
        x, y, bw, bh = d.box
        assert 0 <= x < w and 0 <= y < h and 10 < bw < w / 3 and 10 < bh < h / 2


def test_batch_equals_one_by_one(engine, t1_jpg, astronaut_png):
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in (t1_jpg, astronaut_png)] * 3
    batch = engine.check_images(frames)
    single = [engine.check_image(f) for f in frames]
    for b, s in zip(batch, single):
        assert b.decision == s.decision
        assert b.scores["open_nsfw"] == pytest.approx(s.scores["open_nsfw"], abs=1e-4)


def test_float_tensor_like_input_matches_uint8(engine, astronaut_png):
    rgb = np.asarray(Image.open(astronaut_png).convert("RGB"))
    a = engine.check_image(rgb).scores["open_nsfw"]
    b = engine.check_image(rgb.astype(np.float32) / 255.0).scores["open_nsfw"]
    assert a == pytest.approx(b, abs=1e-3)


def test_no_benign_evaluation_image_is_flagged(engine, shared_eval):
    files = [f for f in sorted(glob.glob(str(shared_eval / "images" / "*" / "*")))
             + sorted(glob.glob(str(shared_eval / "faces" / "deepface" / "images" / "*")))
             if f.lower().endswith((".jpg", ".jpeg", ".png"))]
    assert len(files) >= 80
    flagged = [(f, v.summary()) for f in files
               if (v := engine.check_file(f)).decision is not Decision.ALLOW]
    assert flagged == []
