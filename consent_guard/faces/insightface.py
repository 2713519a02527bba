"""The InsightFace backend: SCRFD (detector) and ArcFace (recognizer) from an InsightFace model
pack, on onnxruntime + numpy + Pillow (no OpenCV, no `insightface` import).

This is a port of the parts of InsightFace's python package that a pack needs
(insightface/model_zoo/scrfd.py, arcface_onnx.py, model_zoo.py and utils/face_align.py), in the
style of its model_zoo: one small class per model, and a router that tells the models apart by
the shapes of their inputs and outputs. cv2's resize and warpAffine are replaced by Pillow's
affine transform with bilinear sampling, which gives the same pixels to within one or two grey
levels inside the image (Pillow puts pixel centres at +0.5, cv2 at integers: `_pil_affine`
converts). Detection is checked against InsightFace's own SCRFD on real weights; recognition
only with a stand-in model of the right shape, since no InsightFace recognition weights are
obtainable offline (tests/test_insightface_backend.py).

ComfyUI users keep packs where InsightFace's FaceAnalysis(root=models/insightface) finds them:
`ComfyUI/models/insightface/models/buffalo_l/*.onnx`.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..models import ModelError, onnx_session, sha256_of
from ..onnx_dequant import read_varint as _varint  # one protobuf varint reader
from .base import Face, l2_normalise

# Cosine similarity at and above which two ArcFace embeddings are taken as the same person.
# NOT measured here: no InsightFace recognition weights can be had offline, so bench/faces.py
# has never run on them. Literature value, unverified: deepface's table of thresholds
# (serengil/deepface, deepface/config/threshold.py) gives "Buffalo_L" (w600k_r50) a cosine
# *distance* of 0.55, i.e. similarity 0.45. Other published values for ArcFace models run from
# 0.23 (InsightFace's LFW verification threshold, L2 distance 1.24, deepinsight/insightface#23)
# and 0.28 (ArcFace at FAR 0.1% on LFW, ronny3050/AdvFaces#7) to 0.5 (the maintainers' example
# in deepinsight/insightface#2848; #168); InsightFace 2.1's own GUI defaults to 0.4 for another
# model. We take 0.35: above the FAR-0.1% point on LFW (so strangers rarely match) and below
# deepface's 0.45, because a missed likeness of a protected person costs more here than a
# blocked stranger. Measure it with `bench/faces.py --insightface-dir` before relying on it.
ARCFACE_THRESHOLD = 0.35

# Packs tried by pack="auto", in this order.
PACKS = ("buffalo_l", "antelopev2", "buffalo_m", "buffalo_s", "buffalo_sc")

# Where the five landmarks go in a 112 x 112 ArcFace crop (face_align.arcface_dst).
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


# --- image operations (cv2 equivalents) ------------------------------------------------------

def _pil_affine(rgb: np.ndarray, inverse: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """cv2.warpAffine-like bilinear warp. `inverse` (2 x 3) maps output pixels to input pixels
    in cv2's convention (pixel centres at integers); Pillow's are at +0.5, hence the shift."""
    lin = inverse[:, :2]
    t = inverse[:, 2] + 0.5 - lin @ np.array([0.5, 0.5])
    coeffs = (lin[0, 0], lin[0, 1], t[0], lin[1, 0], lin[1, 1], t[1])
    image = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
    return np.asarray(image.transform(size, Image.Transform.AFFINE, coeffs,
                                      resample=Image.Resampling.BILINEAR))


def resize_bilinear(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize(rgb, (width, height)) with INTER_LINEAR: bilinear, no antialiasing (Pillow's
    resize would low-pass filter when shrinking, which SCRFD never saw in insightface)."""
    h, w = rgb.shape[:2]
    if (w, h) == (width, height):
        return rgb
    sx, sy = w / width, h / height
    # cv2: src = (dst + 0.5) * s - 0.5
    inverse = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])
    return _pil_affine(rgb, inverse, (width, height))


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity transform (rotation, uniform scale, translation) taking
    `src` points onto `dst` points (Umeyama 1991, as skimage's SimilarityTransform.estimate).
    Returns the 2 x 3 matrix."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # keep a rotation, never a reflection
        d[-1] = -1
    rot = u @ np.diag(d) @ vt
    var = src_c.var(0).sum()
    scale = (s @ d) / var if var > 0 else 1.0
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = dst_mean - scale * rot @ src_mean
    return m


def estimate_norm(landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """face_align.estimate_norm: the 2 x 3 matrix taking the five landmarks onto the ArcFace
    template scaled for `image_size` (a multiple of 112, or of 128 with the template centred)."""
    if image_size % 112 == 0:
        ratio, diff_x = image_size / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio = image_size / 128.0
        diff_x = 8.0 * ratio
    else:
        raise ValueError(f"ArcFace crop size {image_size} is not a multiple of 112 or 128")
    dst = ARCFACE_DST * ratio
    dst[:, 0] += diff_x
    return umeyama(np.asarray(landmarks, np.float64).reshape(5, 2), dst)


def norm_crop(rgb, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """face_align.norm_crop: the aligned image_size x image_size crop (same channels as `rgb`,
    which may be an array or a PIL image)."""
    m = np.vstack([estimate_norm(landmarks, image_size), [0.0, 0.0, 1.0]])
    return _pil_affine(rgb, np.linalg.inv(m)[:2], (image_size, image_size))


# --- SCRFD --------------------------------------------------------------------------------

def nms(dets: np.ndarray, threshold: float) -> List[int]:
    """SCRFD.nms: greedy NMS over rows x1, y1, x2, y2, score; indices kept, best first. Keeps
    InsightFace's +1 pixel convention for widths so the kept set is the same as theirs."""
    x1, y1, x2, y2, scores = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: List[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= threshold]
    return keep


class SCRFDDetector:
    """SCRFD with five landmarks (det_10g, det_2.5g, det_500m, scrfd_*_kps) on an RGB image."""

    name = "scrfd"

    def __init__(self, session, *, input_size=640, score_threshold: float = 0.5,
                 nms_threshold: float = 0.4, path: Optional[Path] = None):
        self.session = session
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        where = f"Model file {path}" if path else "The SCRFD model"
        inp = session.get_inputs()[0]
        outputs = session.get_outputs()
        self.input_name = inp.name
        self.output_names = [o.name for o in outputs]
        # Outputs come as scores per stride, then boxes per stride, then landmarks per stride.
        n = len(outputs)
        if n == 9:
            self.fmc, self.strides, self.anchors = 3, (8, 16, 32), 2
        elif n == 15:
            self.fmc, self.strides, self.anchors = 5, (8, 16, 32, 64, 128), 1
        elif n in (6, 10):
            raise ModelError(
                f"{where} is an SCRFD detector without landmarks ({n} outputs); faces cannot be "
                f"aligned without them. Use a pack's det_10g.onnx / det_500m.onnx (buffalo_l, "
                f"buffalo_s) or another SCRFD model named *_kps.")
        else:
            raise ModelError(f"{where} has {n} outputs; an SCRFD detector has 9 or 15. "
                             f"Use the detector from an InsightFace pack such as buffalo_l.")
        self.batched = len(outputs[0].shape) == 3  # [1, N, C] instead of [N, C]
        # A model exported with a fixed input size is run at that size, as insightface does.
        h, w = inp.shape[2:4]
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            self.input_size = (w, h)
        elif isinstance(input_size, int):
            self.input_size = (input_size, input_size)
        else:
            self.input_size = (int(input_size[0]), int(input_size[1]))
        self._centers: Dict[Tuple[int, int, int], np.ndarray] = {}

    def _anchor_centers(self, height: int, width: int, stride: int) -> np.ndarray:
        key = (height, width, stride)
        if key not in self._centers:
            ys, xs = np.mgrid[:height, :width]
            centers = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
            self._centers[key] = np.repeat(centers, self.anchors, axis=0)  # anchors per cell
        return self._centers[key]

    def _blob(self, rgb: np.ndarray) -> Tuple[np.ndarray, float]:
        """Letterbox into the input size (top-left, aspect kept), as SCRFD.detect, and
        normalise as cv2.dnn.blobFromImage(bgr, 1/128, mean 127.5, swapRB=True): insightface
        feeds BGR and swaps, so the network sees RGB, which is what `rgb` already is."""
        h, w = rgb.shape[:2]
        in_w, in_h = self.input_size
        if h / w > in_h / in_w:
            new_h = in_h
            new_w = max(1, int(new_h / (h / w)))
        else:
            new_w = in_w
            new_h = max(1, int(new_w * (h / w)))
        canvas = np.zeros((in_h, in_w, 3), np.uint8)
        canvas[:new_h, :new_w] = resize_bilinear(rgb, new_w, new_h)
        blob = (canvas.astype(np.float32) - 127.5) / 128.0
        return np.ascontiguousarray(blob.transpose(2, 0, 1)[None]), new_h / h

    def detect(self, rgb: np.ndarray) -> List[Face]:
        rgb = np.ascontiguousarray(rgb[:, :, :3], dtype=np.uint8)
        blob, det_scale = self._blob(rgb)
        outs = self.session.run(self.output_names, {self.input_name: blob})
        if self.batched:
            outs = [o[0] for o in outs]
        in_h, in_w = blob.shape[2:]
        fmc = self.fmc
        rows, points = [], []
        for i, stride in enumerate(self.strides):
            scores = outs[i].reshape(-1)
            hit = scores >= self.score_threshold  # decode only what passes (same result)
            if not hit.any():
                continue
            centers = self._anchor_centers(in_h // stride, in_w // stride, stride)[hit]
            dist = outs[i + fmc][hit] * stride  # distance2bbox: left, top, right, bottom
            boxes = np.concatenate([centers - dist[:, :2], centers + dist[:, 2:]], axis=1)
            kps = outs[i + 2 * fmc][hit].reshape(-1, 5, 2) * stride + centers[:, None, :]
            rows.append(np.concatenate([boxes, scores[hit, None]], axis=1))
            points.append(kps)
        if not rows:
            return []
        dets = np.concatenate(rows).astype(np.float32)
        dets[:, :4] /= det_scale
        kpss = np.concatenate(points).astype(np.float32) / det_scale
        faces = []
        for i in nms(dets, self.nms_threshold):
            x1, y1, x2, y2, score = (float(v) for v in dets[i])
            faces.append(Face((x1, y1, x2 - x1, y2 - y1), score, kpss[i].copy()))
        return faces  # nms returns them best first


# --- ArcFace ------------------------------------------------------------------------------

def _fields(buf, start: int, end: int):
    """Yield (field number, value) of the protobuf message buf[start:end]; the value of a
    length-delimited field is its (start, end) span (nothing is copied, so this is cheap)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield field, value


def first_node_names(path: Path, count: int = 8) -> List[str]:
    """The names of the first `count` nodes of an ONNX file (ModelProto.graph = 7,
    GraphProto.node = 1, NodeProto.name = 3), read without the `onnx` package."""
    names: List[str] = []
    with open(path, "rb") as fp, mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, span in _fields(buf, 0, len(buf)):
            if field != 7 or span is None:
                continue
            for gfield, nspan in _fields(buf, *span):
                if gfield != 1 or nspan is None:
                    continue
                name = ""
                for nfield, value in _fields(buf, *nspan):
                    if nfield == 3 and value is not None:
                        name = buf[value[0]:value[1]].decode("utf-8", "replace")
                names.append(name)
                if len(names) >= count:
                    return names
    return names


def arcface_normalisation(path: Path) -> Tuple[float, float]:
    """ArcFaceONNX's rule: models converted from MXNet subtract and scale inside the graph
    (a Sub and a Mul among the first 8 nodes): feed raw pixels. Others (buffalo_*, antelopev2):
    (x - 127.5) / 127.5."""
    try:
        names = first_node_names(path)
    except (OSError, ValueError, IndexError):  # onnxruntime loaded it, so this is unexpected
        return 127.5, 127.5
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


class ArcFaceEmbedder:
    """ArcFace (w600k_r50, w600k_mbf, glintr100): norm_crop alignment on the five landmarks,
    RGB input normalised as ArcFaceONNX does, L2-normalised output rows."""

    def __init__(self, session, path: Path, *, threshold: float = ARCFACE_THRESHOLD):
        self.session = session
        self.threshold = threshold
        inp = session.get_inputs()[0]
        outputs = session.get_outputs()
        size = inp.shape[2] if len(inp.shape) == 4 else None
        if (len(outputs) != 1 or len(outputs[0].shape) != 2
                or not isinstance(outputs[0].shape[1], int) or not isinstance(size, int)
                or inp.shape[3] != size or not (size % 112 == 0 or size % 128 == 0)):
            raise ModelError(
                f"Model file {path} is not an ArcFace recognizer (input {inp.shape}, outputs "
                f"{[o.shape for o in outputs]}; expected [N, 3, 112, 112] -> [N, D]). Use the "
                f"recognizer of an InsightFace pack (w600k_r50.onnx in buffalo_l).")
        self.input_name = inp.name
        self.output_name = outputs[0].name
        self.input_size = size
        self.dim = int(outputs[0].shape[1])
        # A dynamic batch dimension ('None', a name, or -1) takes every face in one run.
        batch = inp.shape[0]
        self.batch = batch if isinstance(batch, int) and batch > 0 else None
        self.input_mean, self.input_std = arcface_normalisation(path)
        self.model_id = f"arcface-{sha256_of(path)[:12]}"

    def aligned(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """The aligned RGB crop the network sees (input_size x input_size x 3, uint8)."""
        return norm_crop(rgb, face.landmarks, self.input_size)

    def embed(self, rgb: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
        if not faces:
            return np.zeros((0, self.dim), np.float32)
        image = Image.fromarray(np.ascontiguousarray(rgb[:, :, :3], dtype=np.uint8))
        crops = np.stack([norm_crop(image, f.landmarks, self.input_size) for f in faces])
        blob = (crops.astype(np.float32) - self.input_mean) / self.input_std
        blob = np.ascontiguousarray(blob.transpose(0, 3, 1, 2))
        step = self.batch or len(faces)
        out = []
        for start in range(0, len(faces), step):
            chunk = blob[start:start + step]
            n = len(chunk)
            if n < step:  # a fixed batch size: pad the last chunk
                chunk = np.concatenate([chunk, np.zeros((step - n,) + chunk.shape[1:],
                                                        np.float32)])
            out.append(self.session.run([self.output_name], {self.input_name: chunk})[0][:n])
        return l2_normalise(np.concatenate(out))


# --- router and packs -----------------------------------------------------------------------

def route(session) -> Optional[str]:
    """model_zoo.ModelRouter's rule on a session's inputs and outputs: "detector" for SCRFD,
    "recognizer" for ArcFace, None for the pack's other models (landmarks 192 x 192,
    gender/age 96 x 96, inswapper) and anything unknown."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(outputs) >= 5:
        return "detector"
    shape = inputs[0].shape
    if len(shape) != 4 or not all(isinstance(v, int) for v in shape[2:4]):
        return None
    h, w = shape[2:4]
    if h == w == 192 or h == w == 96 or (len(inputs) == 2 and h == w == 128):
        return None
    if (h == w and h >= 112 and h % 16 == 0 and (h % 112 == 0 or h % 128 == 0)
            and len(inputs) == 1 and len(outputs) == 1 and len(outputs[0].shape) == 2):
        return "recognizer"
    return None


def classify_onnx(path: Path) -> Optional[str]:
    """"detector", "recognizer" or None for an .onnx file. Raises ModelError when onnxruntime
    cannot load it (a truncated download, not an ONNX file)."""
    stat = Path(path).stat()
    return _classify(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)  # a pack is scanned by find_pack, then maybe by describe_pack_problem
def _classify(path: str, size: int, mtime_ns: int) -> Optional[str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Only the input and output shapes are read: skip the graph optimisation.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"Model file {path} could not be loaded by onnxruntime: {exc}. "
                         f"Delete it and download the pack again.") from exc
    return route(session)


@dataclass(frozen=True)
class InsightFacePack:
    name: str
    root: Path  # the pack's folder
    detector: Path
    recognizer: Path


def pack_folders(dirs: Sequence[Path], pack: str) -> List[Path]:
    """Where a pack may be, for each dir: <dir>/models/<pack> (FaceAnalysis(root=dir), the
    ComfyUI layout when dir is models/insightface) and <dir>/<pack>."""
    found = []
    for d in dirs:
        for folder in (Path(d) / "models" / pack, Path(d) / pack):
            if folder.is_dir() and folder not in found:
                found.append(folder)
    return found


def scan_pack(folder: Path) -> Tuple[Optional[Path], Optional[Path], List[str]]:
    """The first detector and recognizer among a folder's .onnx files (sorted, as FaceAnalysis
    takes them), and a note for each file that could not be loaded."""
    detector = recognizer = None
    problems = []
    for path in sorted(folder.glob("*.onnx")):
        try:
            kind = classify_onnx(path)
        except ModelError as exc:
            problems.append(str(exc))
            continue
        if kind == "detector" and detector is None:
            detector = path
        elif kind == "recognizer" and recognizer is None:
            recognizer = path
    return detector, recognizer, problems


def find_pack(dirs: Sequence[Path], pack: str = "buffalo_l") -> Optional[InsightFacePack]:
    """The first folder holding `pack` with both a detector and a recognizer, or None.
    pack="auto" tries PACKS in order."""
    for name in (PACKS if pack == "auto" else (pack,)):
        for folder in pack_folders(dirs, name):
            detector, recognizer, _ = scan_pack(folder)
            if detector and recognizer:
                return InsightFacePack(name, folder, detector, recognizer)
    return None


def describe_pack_problem(dirs: Sequence[Path], pack: str = "buffalo_l") -> str:
    """Why find_pack found nothing, in words for the user."""
    names = PACKS if pack == "auto" else (pack,)
    lines = []
    for name in names:
        for folder in pack_folders(dirs, name):
            detector, recognizer, problems = scan_pack(folder)
            missing = [what for what, p in (("an SCRFD detector", detector),
                                            ("an ArcFace recognizer", recognizer)) if not p]
            lines.append(f"{folder} lacks {' and '.join(missing)}" if missing
                         else f"{folder} is complete")
            lines.extend(problems)
    if not lines:
        where = ", ".join(str(Path(d) / "models") for d in dirs) or "(no folders given)"
        return (f"No InsightFace pack ({' / '.join(names)}) was found in {where}. Unpack "
                f"buffalo_l.zip into ComfyUI/models/insightface/models/buffalo_l/.")
    return "; ".join(lines) + ". Download the pack again (buffalo_l.zip from InsightFace)."


def load_insightface(pack: InsightFacePack, device: str = "auto"
                     ) -> Tuple[SCRFDDetector, ArcFaceEmbedder]:
    """The pack's detector and embedder on cached onnxruntime sessions."""
    def session(path: Path):
        try:
            return onnx_session(path, device)
        except ModelError as exc:
            raise ModelError(f"{exc} (InsightFace pack '{pack.name}' in {pack.root}: download "
                             f"the pack again and unpack it there.)") from exc

    detector = SCRFDDetector(session(pack.detector), path=pack.detector)
    embedder = ArcFaceEmbedder(session(pack.recognizer), pack.recognizer)
    return detector, embedder
