"""The faster paths of issue 17 give what the plain ones gave: the banded float -> uint8
conversion bit for bit, the explicit models side by side, the turned copies searched side by
side (the first copy that matches still wins), and the session settings they rely on. No
timing here: bench/speed.py measures."""
import logging
import threading

import numpy as np
import pytest

from consent_guard import Engine, Policy
from consent_guard import imageio, models
from consent_guard.explicit import detect_and_score
from consent_guard.faces import stage
from consent_guard.faces.backends import FaceBackend
from consent_guard.imageio import (ImageInputError, float01_to_uint8, to_rgb_uint8,
                                   uint8_to_float01)
from consent_guard.prepare import PreparedImage
from consent_guard.registry import Consent, Registry
from consent_guard.verdict import Decision

from conftest import FakeFaces, FakeParts, FakeScorer, keyed_image


def whole_array(a):
    """The expression float01_to_uint8 replaces."""
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_banded_conversion_is_bit_identical(dtype, monkeypatch):
    monkeypatch.setattr(imageio, "CHUNK_BYTES", 1000)  # many bands, and a short last one
    rng = np.random.default_rng(1)
    a = (rng.random((37, 23, 3)) * 1.6 - 0.3).astype(dtype)
    # every rounding edge: k / 255, just either side of it, and the half-way points
    edges = np.arange(256) / 255.0
    edges = np.concatenate([edges, np.nextafter(edges, 2), np.nextafter(edges, -1),
                            (np.arange(255) + 0.5) / 255.0]).astype(dtype)
    a.reshape(-1)[:edges.size] = edges
    assert np.array_equal(float01_to_uint8(a), whole_array(a))
    assert np.array_equal(to_rgb_uint8(a), whole_array(a))


def test_banded_conversion_of_odd_shapes():
    for shape in [(1, 1, 1), (5, 1, 4), (2, 3), (0, 4, 3)]:
        a = np.linspace(-0.1, 1.1, int(np.prod(shape)), dtype=np.float32).reshape(shape)
        assert np.array_equal(float01_to_uint8(a), whole_array(a))


def test_nan_in_a_late_band_is_still_refused(monkeypatch):
    monkeypatch.setattr(imageio, "CHUNK_BYTES", 64)
    a = np.zeros((40, 8, 3), np.float32)
    a[-1, -1, -1] = np.nan
    with pytest.raises(ImageInputError, match="NaN"):
        to_rgb_uint8(a)
    a[-1, -1, -1] = np.inf
    with pytest.raises(ImageInputError, match="NaN or infinite"):
        float01_to_uint8(a)


def test_back_to_floats_matches_the_stack_expression():
    frames = [keyed_image(k, (33, 17)) for k in (1, 2, 3)]
    out = uint8_to_float01(frames)
    assert out.dtype == np.float32
    assert np.array_equal(out, np.stack(frames).astype(np.float32) / 255.0)


# -- the explicit models side by side ----------------------------------------------------------
def test_both_models_run_and_pair_with_their_images():
    images = [PreparedImage(keyed_image(k)) for k in (1, 2, 3)]
    parts, scorer = FakeParts(), FakeScorer(whole={2: 0.5})
    detections, wholes = detect_and_score(images, parts, scorer)
    assert parts.calls == [3] and len(detections) == 3
    assert wholes == [0.0, 0.5, 0.0]


def test_a_failing_model_fails_the_check_after_both_finish():
    finished = threading.Event()

    class SlowScorer(FakeScorer):
        def score(self, images):
            out = super().score(images)
            finished.set()
            return out

    with pytest.raises(RuntimeError, match="parts broke"):
        detect_and_score([PreparedImage(keyed_image(1))],
                         FakeParts(error=RuntimeError("parts broke")), SlowScorer())
    assert finished.is_set()  # no thread outlives the call

    class BrokenScorer(FakeScorer):
        def score(self, images):
            raise RuntimeError("scorer broke")

    engine = Engine(Policy(), parts=FakeParts(), scorer=BrokenScorer())
    v = engine.check_image(keyed_image(1))
    assert "scorer broke" in v.error and v.decision is Decision.BLOCK  # fails closed


# -- the turned copies side by side ------------------------------------------------------------
PASS = "speed paths passphrase"
UPSIDE_DOWN = 40  # key seen in the copy turned 180 degrees (TURNS[1])
INVERTED = 255  # key of the colour-inverted upright copy (TURNS[3]) of a black corner


def test_the_first_copy_that_matches_wins_even_when_a_later_one_finishes_first(tmp_path,
                                                                                monkeypatch):
    later_done = threading.Event()

    class Faces(FakeFaces):
        def detect(self, rgb):
            key = int(rgb[0, 0, 0])
            if key == UPSIDE_DOWN:  # the earlier copy waits for the later one to finish
                later_done.wait(timeout=5)
            found = super().detect(rgb)
            if key == INVERTED:
                later_done.set()
            return found

    monkeypatch.setattr(stage, "search_workers", lambda: 4)
    faces = Faces({UPSIDE_DOWN: ["alice"], INVERTED: ["bob"]})
    reg = Registry.create(tmp_path / "identities.db", PASS)
    alice = reg.add("Alice", "any", Consent("Alice"), {faces.model_id: faces.vector("alice")[None]})
    reg.add("Bob", "any", Consent("Bob"), {faces.model_id: faces.vector("bob")[None]})
    rgb = np.full((96, 128, 3), 128, np.uint8)
    rgb[0, 0, 0], rgb[-1, -1, 0] = 0, UPSIDE_DOWN
    engine = Engine(Policy(), parts=FakeParts(), scorer=FakeScorer(), registry=reg,
                    face_backend=FaceBackend("fake", faces, faces))
    v = engine.check_image(rgb)
    reg.close()
    assert later_done.is_set()  # the inverted copy was searched too
    assert v.decision is Decision.BLOCK
    assert [f.identity for f in v.faces if f.identity] == [alice.id]


def test_in_order_keeps_order_and_raises_at_the_items_turn():
    def work(i):
        if i == 2:
            raise ValueError("item 2")
        return i * 10

    got = []
    with pytest.raises(ValueError, match="item 2"):
        for value in stage.in_order(work, range(5)):
            got.append(value)
    assert got == [0, 10]


def test_in_order_stopped_early_drops_what_has_not_started(monkeypatch):
    monkeypatch.setattr(stage, "search_workers", lambda: 1)
    started = []
    gate = threading.Event()

    def work(i):
        started.append(i)
        if i == 0:
            gate.wait(timeout=5)
        return i

    results = stage.in_order(work, range(20))
    gate.set()
    assert next(results) == 0
    results.close()
    assert len(started) < 20


# -- sessions ----------------------------------------------------------------------------------
def test_paired_threads_is_half_the_cpus(monkeypatch):
    monkeypatch.setattr(models.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert models.paired_threads() == 8
    monkeypatch.setattr(models.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert models.paired_threads() == 1


def test_sessions_with_other_thread_counts_are_separate(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    try:
        path = models.ModelResolver().resolve("nudenet_320n")
    except models.ModelError as exc:
        pytest.skip(str(exc))
    one = models.onnx_session(path, "cpu", threads=1)
    assert models.onnx_session(path, "cpu", threads=1) is one
    assert models.onnx_session(path, "cpu") is not one
    assert one.get_session_options().intra_op_num_threads == 1
    assert ("320n.onnx", ["CPUExecutionProvider"]) in models.loaded_sessions()
    assert isinstance(ort.get_available_providers(), list)


def test_a_session_that_fell_back_to_the_cpu_is_reported(caplog):
    class Session:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with caplog.at_level(logging.WARNING, logger="consent_guard"):
        models._check_providers(Session(), ["CPUExecutionProvider"], "x.onnx")
        assert not caplog.records
        models._check_providers(Session(), ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                "x.onnx")
    assert "x.onnx runs on the CPU" in caplog.text


# -- the median copy ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 7, 3), (9, 4, 3), (31, 47, 3), (12, 10)])
def test_median_filter_is_pillows(size, shape):
    from PIL import Image, ImageFilter

    from consent_guard.faces.median import median_filter

    rng = np.random.default_rng(size * 100 + len(shape))
    noisy = rng.integers(0, 256, shape, dtype=np.uint8)
    flat = np.full(shape, 77, np.uint8)
    flat[::3] = 200  # lines, as the red team's grid
    salt = np.where(rng.random(shape) < 0.2, 255, 30).astype(np.uint8)  # salt and pepper
    for a in (noisy, flat, salt):
        pillow = np.asarray(Image.fromarray(a).filter(ImageFilter.MedianFilter(size)))
        assert np.array_equal(median_filter(a, size), pillow)


def test_median_copy_of_a_picture_is_pillows(astronaut_png):
    from PIL import Image, ImageFilter

    rgb = np.asarray(Image.open(astronaut_png).convert("RGB"))
    pillow = np.asarray(Image.fromarray(rgb).filter(ImageFilter.MedianFilter(5)))
    assert np.array_equal(stage.view_of(rgb, "median", 1.0), pillow)
