"""The InsightFace backend (consent_guard/faces/insightface.py).

Detection runs the real SCRFD-500M weights from ../shared/models (skipped where that folder is
absent) on InsightFace's group photo, and is compared with InsightFace's own SCRFD code.

Recognition is tested with a STAND-IN model of the right shape ([N, 3, 112, 112] -> [N, 512],
built here with the `onnx` package from fixed random weights), because no InsightFace
recognition weights (w600k_r50, glintr100, w600k_mbf) can be obtained offline. These tests
check the plumbing (routing, pack discovery, alignment, batching, normalisation, model id),
not that the embeddings recognise anyone, and not ARCFACE_THRESHOLD.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consent_guard.faces.base import Face, FaceDetector, FaceEmbedder
from consent_guard.faces.insightface import (
    ARCFACE_DST, ARCFACE_THRESHOLD, ArcFaceEmbedder, InsightFacePack, SCRFDDetector,
    arcface_normalisation, classify_onnx, describe_pack_problem, estimate_norm, find_pack,
    load_insightface, norm_crop, resize_bilinear)
from consent_guard.models import ModelError, onnx_session, sha256_of

from conftest import SHARED

DET_500M = SHARED / "models" / "insightface_scrfd" / "det_500m.onnx"


@pytest.fixture(autouse=True)
def quiet_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    ort.set_default_logger_severity(3)


@pytest.fixture
def det_path() -> Path:
    if not DET_500M.is_file():
        pytest.skip(f"{DET_500M} is absent (only developers' and CI's checkouts have it)")
    return DET_500M


@pytest.fixture
def t1_rgb(t1_jpg) -> np.ndarray:
    return np.asarray(Image.open(t1_jpg).convert("RGB"))


def build_model(path: Path, size: int = 112, dim: int = 512, seed: int = 0,
                first_names=("Conv_0", "Flatten_1", "MatMul_2")) -> Path:
    """A stand-in ONNX model: input "input.1" [N, 3, size, size] -> average pool 8 x 8 ->
    flatten -> fixed random MatMul -> [N, dim]. Node names are chosen by the caller because
    ArcFaceONNX reads them to pick the input normalisation."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    cells = 3 * (size // 8) ** 2
    weights = np.random.default_rng(seed).standard_normal((cells, dim)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[8, 8],
                         strides=[8, 8], name=first_names[0]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name=first_names[1]),
        helper.make_node("MatMul", ["flat", "W"], ["embedding"], name=first_names[2]),
    ]
    graph = helper.make_graph(
        nodes, "stand_in",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [None, 3, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [None, dim])],
        initializer=[numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by any onnxruntime this project supports
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def rec_path(tmp_path) -> Path:
    return build_model(tmp_path / "w600k_r50.onnx")


def template_face(scale=2.5, angle_deg=20.0, shift=(300.0, 200.0)) -> Face:
    """A face whose landmarks are an exact similarity transform of the ArcFace template."""
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    lm = (ARCFACE_DST @ rot.T + np.array(shift)).astype(np.float32)
    x0, y0 = lm.min(0) - 40
    x1, y1 = lm.max(0) + 40
    return Face((float(x0), float(y0), float(x1 - x0), float(y1 - y0)), 0.9, lm)


def iou(a, b) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@contextlib.contextmanager
def insightface_module(relpath: str, name: str):
    """A module of the installed insightface package, loaded as `_insightface_zoo.<name>`
    without running insightface/__init__.py (which imports requests, skimage, ... for its
    download helpers, not installed here). Skips when the package or the module's own imports
    are missing. Only the `_insightface_zoo` entries are removed from sys.modules afterwards:
    removing what they imported (onnx, cv2) would make a later import load those twice."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the insightface package is not installed")
    folder = Path(list(spec.submodule_search_locations)[0]) / relpath
    package = types.ModuleType("_insightface_zoo")
    package.__path__ = [str(folder)]
    sys.modules["_insightface_zoo"] = package
    try:
        try:
            module = importlib.import_module(f"_insightface_zoo.{name}")
        except ImportError as exc:
            pytest.skip(f"insightface's {relpath}/{name}.py cannot be imported here: {exc}")
        yield module
    finally:
        for key in [k for k in sys.modules if k.split(".")[0] == "_insightface_zoo"]:
            del sys.modules[key]


# --- detection ----------------------------------------------------------------------------

def test_scrfd_finds_the_six_faces(det_path, t1_rgb):
    detector = SCRFDDetector(onnx_session(det_path, "cpu"), path=det_path)
    assert isinstance(detector, FaceDetector) and detector.name == "scrfd"
    faces = detector.detect(t1_rgb)
    assert len(faces) == 6
    h, w = t1_rgb.shape[:2]
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0.5
    for f in faces:
        x, y, bw, bh = f.box
        assert 60 < bw < 200 and 60 < bh < 200 and 1.0 < bh / bw < 1.6  # faces, upright
        assert -5 < x and x + bw < w + 5 and -5 < y and y + bh < h + 5
        assert f.landmarks.shape == (5, 2) and f.landmarks.dtype == np.float32
        assert np.all((f.landmarks >= (x, y)) & (f.landmarks <= (x + bw, y + bh)))
        eyes, nose, mouth = f.landmarks[:2], f.landmarks[2], f.landmarks[3:]
        assert eyes[0, 0] < eyes[1, 0] and mouth[0, 0] < mouth[1, 0]  # image-left first
        assert eyes[:, 1].mean() < nose[1] < mouth[:, 1].mean()


def test_scrfd_matches_insightface(det_path, t1_rgb):
    with insightface_module("model_zoo", "scrfd") as scrfd:
        theirs = scrfd.SCRFD(model_file=str(det_path))
        theirs.prepare(-1, input_size=(640, 640), det_thresh=0.5)
        boxes, kpss = theirs.detect(np.ascontiguousarray(t1_rgb[:, :, ::-1]),  # they take BGR
                                    input_size=(640, 640))
    ours = SCRFDDetector(onnx_session(det_path, "cpu")).detect(t1_rgb)
    assert len(ours) == len(boxes) == 6
    for face, row, kps in zip(ours, boxes, kpss):  # both sorted by score
        x1, y1, x2, y2, score = (float(v) for v in row)
        assert iou(face.box, (x1, y1, x2 - x1, y2 - y1)) > 0.9
        assert abs(face.score - score) < 0.02
        assert np.abs(face.landmarks - kps).max() < 2.0


def test_scrfd_on_small_and_tall_images(det_path, t1_rgb):
    detector = SCRFDDetector(onnx_session(det_path, "cpu"))
    face = detector.detect(t1_rgb)[0]
    x, y, w, h = (int(v) for v in face.box)
    crop = np.ascontiguousarray(t1_rgb[y - 30:y + h + 30, x - 30:x + w + 30])  # upscaled
    found = detector.detect(crop)
    assert len(found) == 1 and iou(found[0].box, (30, 30, w, h)) > 0.7
    tall = np.zeros((1200, 300, 3), np.uint8)
    tall[400:400 + crop.shape[0], :crop.shape[1]] = crop[:, :300]
    assert len(detector.detect(tall)) == 1
    assert detector.detect(np.zeros((50, 80, 3), np.uint8)) == []


class _Shape:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


class _Session:
    def __init__(self, inputs, outputs):
        self._inputs = [_Shape(f"i{i}", s) for i, s in enumerate(inputs)]
        self._outputs = [_Shape(f"o{i}", s) for i, s in enumerate(outputs)]

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs


@pytest.mark.parametrize("n_outputs", [6, 10, 7])
def test_scrfd_without_landmarks_is_refused(n_outputs):
    session = _Session([[1, 3, "?", "?"]], [[100, 1]] * n_outputs)
    with pytest.raises(ModelError, match="det.onnx"):
        SCRFDDetector(session, path=Path("det.onnx"))


def test_resize_matches_cv2():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    for size in [(65, 45), (200, 139), (130, 90), (17, 300)]:
        diff = np.abs(resize_bilinear(img, *size).astype(int) - cv2.resize(img, size))
        assert diff.max() <= 1


# --- alignment ----------------------------------------------------------------------------

def test_norm_crop_maps_landmarks_onto_the_template():
    face = template_face()
    m = estimate_norm(face.landmarks)
    warped = face.landmarks @ m[:, :2].T + m[:, 2]
    assert np.abs(warped - ARCFACE_DST).max() < 2.0  # exact here up to float error
    assert np.abs(warped - ARCFACE_DST).max() < 1e-3


def test_estimate_norm_is_the_least_squares_similarity():
    """Umeyama's answer equals linear least squares over x' = a x - b y + tx, y' = b x + a y
    + ty (every rotation + uniform scale + shift, and nothing else)."""
    rng = np.random.default_rng(5)
    for _ in range(5):
        lm = template_face(rng.uniform(0.5, 4), rng.uniform(-40, 40),
                           rng.uniform(0, 500, 2)).landmarks + rng.normal(0, 3, (5, 2))
        x, y = lm[:, 0], lm[:, 1]
        one, zero = np.ones(5), np.zeros(5)
        a_mat = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
        (a, b, tx, ty), *_ = np.linalg.lstsq(a_mat, ARCFACE_DST.T.reshape(-1), rcond=None)
        expected = np.array([[a, -b, tx], [b, a, ty]])
        assert np.abs(estimate_norm(lm) - expected).max() < 1e-4


def test_norm_crop_pixels_match_cv2_warp_affine():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(7)
    img = cv2.GaussianBlur(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8), (7, 7), 2)
    face = template_face()
    ours = norm_crop(img, face.landmarks)
    theirs = cv2.warpAffine(img, estimate_norm(face.landmarks), (112, 112), borderValue=0.0)
    assert ours.shape == (112, 112, 3)
    assert np.abs(ours.astype(int) - theirs).max() <= 2


# --- recognition with the stand-in model --------------------------------------------------

def test_router(det_path, rec_path, tmp_path):
    assert classify_onnx(det_path) == "detector"
    assert classify_onnx(rec_path) == "recognizer"
    assert classify_onnx(build_model(tmp_path / "2d106det.onnx", size=192, dim=212)) is None
    broken = tmp_path / "truncated.onnx"
    broken.write_bytes(rec_path.read_bytes()[:1000])
    with pytest.raises(ModelError, match="truncated.onnx"):
        classify_onnx(broken)


def test_arcface_embedder(rec_path):
    embedder = ArcFaceEmbedder(onnx_session(rec_path, "cpu"), rec_path)
    assert isinstance(embedder, FaceEmbedder)
    assert embedder.model_id == f"arcface-{sha256_of(rec_path)[:12]}"
    assert embedder.dim == 512 and embedder.batch is None
    assert embedder.threshold == ARCFACE_THRESHOLD
    assert (embedder.input_mean, embedder.input_std) == (127.5, 127.5)
    rng = np.random.default_rng(11)
    img = rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)
    a, b = template_face(), template_face(2.0, -10.0, (500.0, 300.0))
    out = embedder.embed(img, [a, b, a])
    assert out.shape == (3, 512) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert out[0] @ out[2] == pytest.approx(1.0, abs=1e-5)  # the same face twice
    assert out[0] @ out[1] < 0.999
    alone = embedder.embed(img, [b])  # one at a time gives what the batch gave
    assert np.allclose(alone[0], out[1], atol=1e-5)
    assert embedder.embed(img, []).shape == (0, 512)
    assert embedder.aligned(img, a).shape == (112, 112, 3)


def test_arcface_fixed_batch_and_mxnet_normalisation(tmp_path):
    mx = build_model(tmp_path / "mx.onnx", first_names=("_minusscalar0", "_mulscalar0", "fc1"))
    assert arcface_normalisation(mx) == (0.0, 1.0)  # the graph normalises itself
    embedder = ArcFaceEmbedder(onnx_session(mx, "cpu"), mx)
    embedder.batch = 1  # as a model exported with batch size 1 reports it
    img = np.random.default_rng(2).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    faces = [template_face(), template_face(2.0, -10.0, (500.0, 300.0))]
    embedder_dynamic = ArcFaceEmbedder(onnx_session(mx, "cpu"), mx)
    assert np.allclose(embedder.embed(img, faces), embedder_dynamic.embed(img, faces),
                       atol=1e-5)


def test_arcface_rejects_a_detector(det_path):
    with pytest.raises(ModelError, match="det_500m.onnx"):
        ArcFaceEmbedder(onnx_session(det_path, "cpu"), det_path)


# --- packs --------------------------------------------------------------------------------

def make_pack(root: Path, det_path: Path, recognizer: bool = True, name: str = "buffalo_l"
              ) -> Path:
    folder = root / "models" / name
    folder.mkdir(parents=True)
    shutil.copyfile(det_path, folder / "det_500m.onnx")
    build_model(folder / "2d106det.onnx", size=192, dim=212)  # a landmark model: ignored
    if recognizer:
        build_model(folder / "w600k_r50.onnx")
    return folder


def test_find_pack_comfyui_layout(det_path, tmp_path):
    folder = make_pack(tmp_path, det_path)
    pack = find_pack([tmp_path])
    assert pack == InsightFacePack("buffalo_l", folder, folder / "det_500m.onnx",
                                   folder / "w600k_r50.onnx")
    assert find_pack([tmp_path], "auto") == pack
    assert find_pack([tmp_path / "models"]) == pack  # <dir>/buffalo_l also accepted
    assert find_pack([tmp_path], "antelopev2") is None
    detector, embedder = load_insightface(pack, "cpu")
    faces = detector.detect(np.asarray(Image.new("RGB", (64, 64))))
    assert faces == [] and embedder.dim == 512


def test_pack_without_recognizer(det_path, tmp_path):
    make_pack(tmp_path, det_path, recognizer=False)
    assert find_pack([tmp_path]) is None
    assert find_pack([tmp_path], "auto") is None
    assert "lacks an ArcFace recognizer" in describe_pack_problem([tmp_path])
    assert "No InsightFace pack" in describe_pack_problem([tmp_path / "nowhere"])


def test_auto_takes_the_first_complete_pack(det_path, tmp_path):
    make_pack(tmp_path, det_path, recognizer=False, name="buffalo_l")
    second = make_pack(tmp_path, det_path, name="buffalo_s")
    pack = find_pack([tmp_path], "auto")
    assert pack is not None and pack.name == "buffalo_s" and pack.root == second


def test_load_names_the_broken_file(det_path, tmp_path):
    folder = make_pack(tmp_path, det_path)
    pack = find_pack([tmp_path])
    broken = folder / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="broken.onnx.*buffalo_l"):
        load_insightface(InsightFacePack("buffalo_l", folder, pack.detector, broken), "cpu")
