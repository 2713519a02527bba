"""YuNet + SFace on OpenCV's dnn (the int8 files, as before) against onnxruntime (the float32
files made from them, as now), on the same images in one process.

    python bench/face_runtime.py [--shared PATH] [--rounds N]

Needs OpenCV >= 4.11 with the objdetect module (the only OpenCV that loads the int8 files);
skips with exit code 0 and a note where it or ../shared is missing.

Data: ../shared/eval/faces/deepface/images and the benign images in ../shared/eval/images.
Each image is cut down as the face stage does (longest side 640) and both runtimes get the
same pixels. Prints:
  - detection: faces found by each, how many pair up (IoU >= 0.5), and over the pairs the
    largest difference in box (px), landmarks (px) and score;
  - embeddings, each runtime end to end (its own landmarks and alignment): cosine between the
    two embeddings of each paired face, min and median; and the same with OpenCV's landmarks
    for both (alignment and network only);
  - decisions: each deepface identity enrolled from its first photo with each runtime, every
    face of every image matched at SFACE_THRESHOLD: identity or none, same or not;
  - time per image (detection) and per face (alignment + embedding), median of --rounds, as
    a ratio onnxruntime / OpenCV.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from consent_guard.faces.base import Face, l2_normalise  # noqa: E402
from consent_guard.faces.yunet_sface import SFACE_THRESHOLD, load_yunet_sface  # noqa: E402
from consent_guard.models import ModelResolver  # noqa: E402

DETECT_SIZE = 640


class OpenCVYuNetSFace:
    """The backend as it was: OpenCV's FaceDetectorYN and FaceRecognizerSF on the int8 files."""

    def __init__(self, cv2, resolver: ModelResolver):
        self.cv2 = cv2
        self.det = cv2.FaceDetectorYN.create(str(resolver.resolve("yunet")), "", (320, 320),
                                             0.5, 0.3, 5000)
        self.rec = cv2.FaceRecognizerSF.create(str(resolver.resolve("sface")), "")

    def detect(self, rgb):
        h, w = rgb.shape[:2]
        self.det.setInputSize((w, h))
        _, rows = self.det.detect(np.ascontiguousarray(rgb[:, :, ::-1]))
        return np.zeros((0, 15), np.float32) if rows is None else rows

    def embed(self, rgb, row):
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        crop = self.rec.alignCrop(bgr, row[None].astype(np.float32))
        return l2_normalise(self.rec.feature(crop).reshape(-1))


def face_of(row) -> Face:
    return Face(tuple(float(v) for v in row[:4]), float(row[14]),
                np.asarray(row[4:14], np.float32).reshape(5, 2))


def iou(a, b) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter / max(a[2] * a[3] + b[2] * b[3] - inter, 1e-9)


def pairs(rows_cv, rows_ort):
    """Greedy pairing of the two runtimes' faces by IoU (best first, IoU >= 0.5)."""
    out, used = [], set()
    for i, a in enumerate(rows_cv):
        best = max(((iou(a, b), j) for j, b in enumerate(rows_ort) if j not in used),
                   default=(0.0, -1))
        if best[0] >= 0.5:
            used.add(best[1])
            out.append((i, best[1]))
    return out


def load(path: Path) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    scale = DETECT_SIZE / max(img.size)
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
    return np.asarray(img)


def timed(fn, rounds):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    eval_dir = Path(a.shared) / "eval"
    faces_dir = eval_dir / "faces" / "deepface" / "images"
    files = sorted(faces_dir.glob("*")) + sorted((eval_dir / "images").glob("*/*"))
    files = [f for f in files if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
    if not files:
        print(f"skipped: no evaluation images under {eval_dir}")
        return 0
    try:
        import cv2
    except ImportError:
        print("skipped: OpenCV is not installed (needed only for this comparison)")
        return 0
    resolver = ModelResolver()
    try:
        cv = OpenCVYuNetSFace(cv2, resolver)
    except cv2.error as exc:
        print(f"skipped: OpenCV {cv2.__version__} cannot load the int8 files ({exc})")
        return 0
    detector, embedder = load_yunet_sface(resolver, "cpu")
    import onnxruntime

    print(f"OpenCV {cv2.__version__} (int8 files) vs onnxruntime {onnxruntime.__version__} "
          f"(float32 files), {len(files)} images from {eval_dir}")

    n_cv = n_ort = 0
    box_d, lm_d, score_d, cos_e2e, cos_net = [], [], [], [], []
    t_det_cv, t_det_ort, t_emb_cv, t_emb_ort = [], [], [], []
    per_image = []  # (file, [(emb_cv, emb_ort)] for paired faces, unpaired count)
    for f in files:
        rgb = load(f)
        rows_cv = cv.detect(rgb)
        rows_ort = detector.raw(rgb)
        n_cv += len(rows_cv)
        n_ort += len(rows_ort)
        t_det_cv.append(timed(lambda: cv.detect(rgb), a.rounds))
        t_det_ort.append(timed(lambda: detector.raw(rgb), a.rounds))
        matched = pairs(rows_cv, rows_ort)
        embs = []
        for i, j in matched:
            rc, ro = rows_cv[i], rows_ort[j]
            box_d.append(float(np.abs(rc[:4] - ro[:4]).max()))
            lm_d.append(float(np.abs(rc[4:14] - ro[4:14]).max()))
            score_d.append(float(abs(rc[14] - ro[14])))
            e_cv = cv.embed(rgb, rc)
            e_ort = embedder.embed(rgb, [face_of(ro)])[0]
            e_net = embedder.embed(rgb, [face_of(rc)])[0]
            cos_e2e.append(float(e_cv @ e_ort))
            cos_net.append(float(e_cv @ e_net))
            t_emb_cv.append(timed(lambda: cv.embed(rgb, rc), a.rounds))
            t_emb_ort.append(timed(lambda: embedder.embed(rgb, [face_of(ro)]), a.rounds))
            embs.append((e_cv, e_ort))
        per_image.append((f, embs, len(rows_cv) + len(rows_ort) - 2 * len(matched)))

    unpaired = sum(u for _, _, u in per_image)
    print(f"\ndetection: OpenCV {n_cv} faces, onnxruntime {n_ort}, paired {len(box_d)}, "
          f"unpaired {unpaired}")
    if box_d:
        print(f"  box max abs diff {max(box_d):.2e} px, landmarks {max(lm_d):.2e} px, "
              f"score {max(score_d):.2e}")
        print(f"embeddings (cosine OpenCV vs onnxruntime, {len(cos_e2e)} faces):")
        print(f"  end to end      min {min(cos_e2e):.7f}  median {statistics.median(cos_e2e):.7f}")
        print(f"  same landmarks  min {min(cos_net):.7f}  median {statistics.median(cos_net):.7f}")

    # decisions: enrol each deepface identity from its first photo, match every paired face
    clusters = defaultdict(list)
    ids_csv = faces_dir.parent / "identities.csv"
    if ids_csv.is_file():
        for row in csv.DictReader(open(ids_csv)):
            if row["cluster_id"].startswith("id"):
                clusters[row["cluster_id"]].append(row["file"])
    by_name = {f.name: embs for f, embs, _ in per_image}
    enrolled = [(c, by_name[sorted(fs)[0]][0]) for c, fs in sorted(clusters.items())
                if by_name.get(sorted(fs)[0])]
    if enrolled:
        gal_cv = np.stack([e[0] for _, e in enrolled])
        gal_ort = np.stack([e[1] for _, e in enrolled])
        names = [c for c, _ in enrolled]

        def decide(gallery, emb):
            s = gallery @ emb
            k = int(np.argmax(s))
            return names[k] if s[k] >= SFACE_THRESHOLD else None

        same = differ = matched_any = 0
        for _, embs, _ in per_image:
            for e_cv, e_ort in embs:
                d_cv, d_ort = decide(gal_cv, e_cv), decide(gal_ort, e_ort)
                same += d_cv == d_ort
                differ += d_cv != d_ort
                matched_any += d_cv is not None
        print(f"decisions ({len(enrolled)} identities enrolled, threshold {SFACE_THRESHOLD}): "
              f"{same} same, {differ} different, of {same + differ} faces "
              f"({matched_any} matched someone under OpenCV)")

    if t_det_cv:
        r_det = sum(t_det_ort) / sum(t_det_cv)
        print(f"\ntime, median of {a.rounds} runs, summed over images:")
        print(f"  detection  OpenCV {1000 * sum(t_det_cv) / len(t_det_cv):.1f} ms/image, "
              f"onnxruntime {1000 * sum(t_det_ort) / len(t_det_ort):.1f} ms/image, "
              f"ratio {r_det:.2f}")
    if t_emb_cv:
        r_emb = sum(t_emb_ort) / sum(t_emb_cv)
        print(f"  embedding  OpenCV {1000 * sum(t_emb_cv) / len(t_emb_cv):.1f} ms/face, "
              f"onnxruntime {1000 * sum(t_emb_ort) / len(t_emb_ort):.1f} ms/face, "
              f"ratio {r_emb:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
