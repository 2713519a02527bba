"""Benign-image false positives and the full check's speed, on named data.

    python bench/images.py [--rounds N] [--shared PATH]

Data: ../shared/eval/images (skimage + darknet samples) and ../shared/eval/faces/deepface/images
(adult faces): 90 benign images. Prints
  - how many the full check censors or blocks at the default policy (target 0), next to what
    each model alone would flag at its published operating point;
  - the full check's time per image (file decode, both models, the rule) as a ratio to NudeNet's
    own `NudeDetector.detect` on the same files in the same process (target <= 1.3x).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from consent_guard import Decision, Engine  # noqa: E402
from consent_guard.explicit import PART_CATEGORY  # noqa: E402
from consent_guard.imageio import read_image_frames  # noqa: E402
from consent_guard.prepare import WORK_SIZE, PreparedImage  # noqa: E402


def benign_files(shared: Path):
    eval_dir = shared / "eval"
    files = sorted((eval_dir / "images").glob("*/*")) + sorted(
        (eval_dir / "faces" / "deepface" / "images").glob("*"))
    return [f for f in files if f.suffix.lower() in (".jpg", ".jpeg", ".png")]


def nudenet_reference():
    """NudeNet's own NudeDetector (the timing reference), or None, with why, when it cannot
    be made here."""
    try:
        from nudenet import NudeDetector
    except ImportError as exc:
        print(f"NudeNet's own detector is the timing reference and needs cv2: "
              f"pip install 'opencv-python-headless<5' ({exc})", file=sys.stderr)
        return None
    return NudeDetector()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    files = benign_files(Path(a.shared))
    if not files:
        print(f"no evaluation images under {a.shared}/eval", file=sys.stderr)
        return 2
    reference = nudenet_reference()
    if reference is None:
        return 2

    engine = Engine()
    engine.load()
    policy = engine.policy
    print(f"data: {len(files)} benign images from {a.shared}/eval (images/*, faces/deepface/images)")

    # 1. decisions
    flagged, nudenet_own, nsfw_mid, nsfw_high, ours_parts = [], [], [], [], []
    for f in files:
        v = engine.check_file(f)
        if v.decision is not Decision.ALLOW:
            flagged.append((f.name, v.summary()))
        own = [d for d in reference.detect(str(f))
               if d["class"] in PART_CATEGORY and d["score"] >= 0.25]
        if own:
            nudenet_own.append(f"{f.name} ({', '.join(d['class'] + ' %.2f' % d['score'] for d in own)})")
        s = v.scores.get("open_nsfw", 0.0)
        if s >= 0.5:
            nsfw_mid.append(f"{f.name} ({s:.2f})")
        if s >= policy.open_nsfw_explicit_at:
            nsfw_high.append(f.name)
        if v.scores.get("nudenet_exposed_max", 0.0) >= policy.nudenet_min_score:
            ours_parts.append(f"{f.name} ({v.scores['nudenet_exposed_max']:.2f})")
    print(f"\nfull check, default policy: {len(flagged)} of {len(files)} censored or blocked (target 0)")
    for name, why in flagged:
        print(f"  {name}: {why}")
    print(f"NudeNet alone (its own detect, exposed parts >= 0.25): {len(nudenet_own)} flagged: "
          + "; ".join(nudenet_own))
    print(f"NudeNet stage inside our check (shared preprocessing) >= 0.25: {len(ours_parts)}: "
          + "; ".join(ours_parts))
    print(f"open_nsfw alone >= 0.8: {len(nsfw_high)}; >= 0.5 (its package default): "
          f"{len(nsfw_mid)}: " + "; ".join(nsfw_mid))

    # 2. speed: interleaved, same files, same process; median of per-round totals
    for f in files[:3]:  # warm both
        engine.check_file(f)
        reference.detect(str(f))
    ours_t, ref_t = [], []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        for f in files:
            engine.check_file(f)
        t1 = time.perf_counter()
        for f in files:
            reference.detect(str(f))
        t2 = time.perf_counter()
        ours_t.append((t1 - t0) / len(files))
        ref_t.append((t2 - t1) / len(files))
    ours, ref = statistics.median(ours_t), statistics.median(ref_t)
    print(f"\ntime per image (median of {a.rounds} rounds over {len(files)} files):")
    print(f"  full check (decode, NudeNet + open_nsfw, rule): {ours * 1000:.1f} ms")
    print(f"  NudeNet's own NudeDetector.detect:               {ref * 1000:.1f} ms")
    print(f"  ratio: {ours / ref:.2f}x (target <= 1.3x)")

    # 3. where the time goes, on decoded images
    decoded = [read_image_frames(f, policy.max_pixels, draft_size=WORK_SIZE) for f in files]
    t0 = time.perf_counter()
    prepared = [PreparedImage(frames[0], size) for frames, size in decoded]
    for p in prepared:
        p.nudenet_input, p.opennsfw_input  # noqa: B018  (materialise the cached inputs)
    t1 = time.perf_counter()
    engine._parts.detect(prepared)
    t2 = time.perf_counter()
    engine._scorer.score(prepared)
    t3 = time.perf_counter()
    n = len(files)
    print(f"  stages per image: preprocess {1000 * (t1 - t0) / n:.1f} ms, NudeNet "
          f"{1000 * (t2 - t1) / n:.1f} ms, open_nsfw {1000 * (t3 - t2) / n:.1f} ms (batched)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
