"""The image check's speed against NudeNet's own detector, and whether any decision moved.

    python bench/speed.py [--rounds N] [--shared PATH] [--cases explicit,faces,batch]
                          [--stages] [--baseline REF|none] [--baseline-timing]

Cases (each a ratio in one process, interleaved rounds: our check and the reference take turns,
the order swapped every round, median of the per-round totals):
  explicit  the full check (file decode, both explicit models, the rule, the minors rule where
            it applies) at the default policy with nobody enrolled, on the 90 benign images
            of ../shared/eval (bench/images.py's set), against NudeNet's
            `NudeDetector.detect` on the same files (issue 17 target <= 1.0x);
  faces     the same with 10 identities enrolled (the first photo of deepface id01..id10,
            scope any) on the deepface photos, a face on every one (target <= 1.5x);
  batch     the ComfyUI node's path for a batch of 16 at 1024 and 2048 px (float tensor ->
            pixels, check, the picture shown, back to a float tensor), ms per image as a
            ratio to a batch of one; the float -> uint8 conversion is timed on its own.

Agreement: every case's decisions, labels and matched identities are compared with those of
the code at git ref --baseline (default HEAD, exported with `git archive` to a temporary
folder and run in a subprocess on the same files and the same registry); "none" skips it.
--baseline-timing also times that code against NudeDetector.detect the same way, in its own
process, so a before/after pair of ratios comes from one run.

--stages prints where the time goes (decode, preprocessing, each model, face detection,
embedding, matching, the turned-copy search) per image, for the search the detector runs and
faces embedded per searched image and the time in each model, and the execution providers
every onnxruntime session uses: on a GPU machine with onnxruntime-gpu these are the absolute
figures. With people enrolled it also times the check with the turned/cleaned copies' search
switched off: the floor that no change to that search can go below; and the check with the
identity check run after the explicit models instead of beside them (as before 8e0a2c5),
interleaved with the check as it runs.

Needs ../shared/eval (exits 2 without it) and, for the reference, nudenet's own package with
OpenCV (`pip install 'opencv-python-headless<5'`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from consent_guard import Engine  # noqa: E402
from consent_guard.imageio import iter_image_frames, to_rgb_uint8  # noqa: E402
from consent_guard.models import ModelResolver, loaded_sessions  # noqa: E402
from consent_guard.prepare import WORK_SIZE, PreparedImage  # noqa: E402
from images import benign_files, nudenet_reference  # noqa: E402  (bench/images.py)

PASSPHRASE = "bench passphrase, not a secret"
ENROLLED = 10
BATCH = 16


# -- data ------------------------------------------------------------------------------------
def face_files(shared: Path) -> List[Path]:
    return [f for f in benign_files(shared) if "deepface" in f.parts]


def first_photos(shared: Path, n: int) -> List[Path]:
    """The first photo (by number) of deepface identities id01..id<n>."""
    import csv

    folder = shared / "eval" / "faces" / "deepface"
    by_id: Dict[str, List[str]] = {}
    for row in csv.DictReader(open(folder / "identities.csv")):
        if row["cluster_id"].startswith("id"):
            by_id.setdefault(row["cluster_id"], []).append(row["file"])

    def number(name: str):
        digits = "".join(ch for ch in name if ch.isdigit())
        return int(digits) if digits else 0, name

    return [folder / "images" / min(by_id[c], key=number) for c in sorted(by_id)[:n]]


def make_registry(path: Path, photos: Sequence[Path]):
    """A registry of one identity per photo (scope any), embedded with the default backend."""
    from consent_guard.faces.backends import opencv_backend
    from consent_guard.faces.enrol import embed_photos
    from consent_guard.policy import Policy
    from consent_guard.registry import Consent, Registry

    policy = Policy()
    backend = opencv_backend(policy, ModelResolver(policy.model_paths))
    registry = Registry.create(path, PASSPHRASE)
    for i, photo in enumerate(photos):
        vectors, checks = embed_photos([photo], [backend], policy.max_pixels)
        if not vectors:
            raise SystemExit(f"could not enrol {photo.name}: {checks[0].reason}")
        registry.add(f"person {i + 1}", "any", Consent("bench"), vectors)
    return registry


# -- decisions and agreement -----------------------------------------------------------------
def outcome(verdict) -> dict:
    """What must not move: the decision, the reasons' labels and the matched identities."""
    return {"decision": verdict.decision.value, "error": verdict.error is not None,
            "labels": sorted(f"{r.check}:{r.label}:{r.category}:{r.action.value}"
                             for r in verdict.reasons),
            "identities": sorted(f.identity for f in verdict.faces if f.identity),
            "open_nsfw": float(verdict.scores.get("open_nsfw", -1.0))}


DECIDE_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from consent_guard import Engine
from consent_guard.registry import Registry
args = json.loads(sys.argv[2])
registry = Registry.open(Path(args["registry"]), passphrase=args["passphrase"]) \\
    if args["registry"] else None
engine = Engine(registry=registry)
out = {}
for f in args["files"]:
    v = engine.check_file(Path(f))
    out[f] = {"decision": v.decision.value, "error": v.error is not None,
              "labels": sorted(f"{r.check}:{r.label}:{r.category}:{r.action.value}"
                               for r in v.reasons),
              "identities": sorted(x.identity for x in v.faces if x.identity),
              "open_nsfw": float(v.scores.get("open_nsfw", -1.0))}
if args["rounds"]:  # the same timing as against_nudenet, on this code
    import statistics, time
    from nudenet import NudeDetector
    ref = NudeDetector()
    files = [Path(f) for f in args["files"]]
    ours_t, ref_t = [], []
    for r in range(args["rounds"] + 1):  # the first round warms both
        pair = [(engine.check_file, ours_t), (lambda f: ref.detect(str(f)), ref_t)]
        for fn, times in (pair if r % 2 == 0 else pair[::-1]):
            t = time.perf_counter()
            for f in files:
                fn(f)
            if r:
                times.append(time.perf_counter() - t)
    out["__ratio__"] = statistics.median(ours_t) / statistics.median(ref_t)
print(json.dumps(out))
"""


def baseline_outcomes(ref: str, files: Sequence[Path], registry_path: Optional[Path],
                      rounds: int = 0) -> Optional[Dict[str, dict]]:
    """The decisions of the code at git `ref` on the same files (None when git or the ref is
    not available). The tree is exported with `git archive`: the checkout is not touched.
    With `rounds`, that code's time is also measured against NudeDetector.detect, in its own
    process, as against_nudenet does ("__ratio__")."""
    with tempfile.TemporaryDirectory(prefix="cg-baseline-") as tmp:
        archive = Path(tmp) / "tree.tar"
        try:
            subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), ref],
                           check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"  (no baseline: git archive {ref} failed: {exc})")
            return None
        with tarfile.open(archive) as tar:
            tar.extractall(Path(tmp) / "tree", filter="data")
        args = {"files": [str(f) for f in files], "passphrase": PASSPHRASE,
                "registry": str(registry_path) if registry_path else "", "rounds": rounds}
        run = subprocess.run([sys.executable, "-c", DECIDE_SCRIPT, str(Path(tmp) / "tree"),
                              json.dumps(args)], capture_output=True, text=True)
        if run.returncode:
            print(f"  (no baseline: the code at {ref} failed: {run.stderr.strip()[-500:]})")
            return None
        return json.loads(run.stdout.strip().splitlines()[-1])


def print_agreement(ref: str, now: Dict[str, dict], before: Optional[Dict[str, dict]]) -> None:
    if before is None:
        return
    ratio = before.pop("__ratio__", None)
    if ratio is not None:
        print(f"  the code at {ref}, timed the same way in its own process: ratio {ratio:.2f}x "
              f"to NudeDetector.detect")
    keys = ("decision", "error", "labels", "identities")
    same = [f for f in now if all(now[f][k] == before[f][k] for k in keys)]
    drift = max(abs(now[f]["open_nsfw"] - before[f]["open_nsfw"]) for f in now)
    print(f"  agreement with {ref}: {len(same)} of {len(now)} files have the same decision, "
          f"labels and identities; largest open_nsfw change {drift:.2g}")
    for f in now:
        if f not in same:
            print(f"    DIFFERS {Path(f).name}: before {before[f]}, now {now[f]}")


def decisions(engine: Engine, files: Sequence[Path]) -> Dict[str, dict]:
    return {str(f): outcome(engine.check_file(f)) for f in files}


# -- timing ----------------------------------------------------------------------------------
def interleaved(ours: Callable[[], None], reference: Callable[[], None], rounds: int):
    """Median seconds of each over `rounds`, the two taking turns, the order swapped each
    round so that neither always runs on a machine the other just warmed or loaded."""
    ours(), reference()  # warm both
    ours_t, ref_t = [], []
    for r in range(rounds):
        pair = [(ours, ours_t), (reference, ref_t)]
        for fn, out in (pair if r % 2 == 0 else pair[::-1]):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(ours_t), statistics.median(ref_t)


def against_nudenet(name: str, engine: Engine, files: Sequence[Path], detector, rounds: int,
                    target: float) -> None:
    def ours():
        for f in files:
            engine.check_file(f)

    def ref():
        for f in files:
            detector.detect(str(f))

    t_ours, t_ref = interleaved(ours, ref, rounds)
    n = len(files)
    print(f"  {name}: {1000 * t_ours / n:.1f} ms/image, NudeDetector.detect "
          f"{1000 * t_ref / n:.1f} ms/image, ratio {t_ours / t_ref:.2f}x (target <= {target}x; "
          f"median of {rounds} interleaved rounds over {n} files)")


# -- stages ----------------------------------------------------------------------------------
def timed(fn: Callable, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def stage_times(engine: Engine, files: Sequence[Path]) -> None:
    """Per image: decode, preprocessing, each explicit model; then, when anyone is enrolled,
    face detection, embedding, matching and the turned-copy search."""
    from consent_guard.faces.stage import detect_faces, turned_findings

    policy = engine.policy
    draft = max(WORK_SIZE, 2 * policy.detect_size)
    totals: Dict[str, float] = {}

    def add(key: str, seconds: float) -> None:
        totals[key] = totals.get(key, 0.0) + seconds

    stage = engine.face_stage()
    faces_seen = searched = 0
    search_runs: Dict[str, float] = {}
    for f in files:
        (frame, size), t = timed(lambda: next(iter_image_frames(f, policy.max_pixels, draft)))
        add("decode", t)
        prepared, t = timed(PreparedImage, frame, size)
        add("prepare (working copy)", t)
        _, t = timed(lambda: (prepared.nudenet_input, prepared.opennsfw_input))
        add("prepare (model inputs)", t)
        _, t = timed(engine._parts.detect, [prepared])
        add("NudeNet", t)
        _, t = timed(engine._scorer.score, [prepared])
        add("open_nsfw", t)
        if stage is None:
            continue
        to_full = size[0] / frame.shape[1]
        faces, t = timed(detect_faces, stage.detector, frame, stage.detect_size,
                         stage.min_face_px / to_full)
        add("faces: detect", t)
        big = stage.matchable(faces, to_full)
        faces_seen += len(big)
        vectors, t = timed(stage.embedder.embed, frame, big)
        add("faces: embed", t)
        matches, t = timed(lambda: stage._gallery().match(vectors, stage.threshold))
        add("faces: match", t)
        if not any(matches):
            with counting(stage) as runs:
                _, t = timed(lambda: turned_findings(stage, frame, to_full, seen=big))
            add("faces: turned/cleaned copies", t)
            searched += 1
            for key, value in runs.items():
                search_runs[key] = search_runs.get(key, 0) + value
    n = len(files)
    print("  stages, one image at a time (here the two explicit models run one after the "
          "other, each on its own half of the CPUs; the check runs them side by side):")
    for key, seconds in totals.items():
        print(f"    {key:32} {1000 * seconds / n:7.1f} ms/image")
    if stage is not None:
        print(f"    ({faces_seen} matchable faces in {n} images)")
    if searched:
        per = {k: v / searched for k, v in search_runs.items()}
        print(f"    the turned/cleaned search ran on {searched} images (nobody matched "
              f"upright); for each: {per['detections']:.1f} detector runs, "
              f"{per['faces']:.1f} faces embedded; the detector "
              f"{1000 * per['detect s']:.0f} ms, the embedder {1000 * per['embed s']:.0f} ms "
              f"({1000 * per['embed s'] / max(per['faces'], 1):.0f} ms a face), summed over "
              f"the search's threads (they overlap: the sum can exceed the search's time)")


@contextmanager
def counting(stage):
    """The detector runs, faces embedded and the seconds in each model while inside, for
    the face stage's own detector and embedder (the search's threads included)."""
    runs = {"detections": 0, "faces": 0, "detect s": 0.0, "embed s": 0.0}
    lock = threading.Lock()
    detect, embed = stage.detector.detect, stage.embedder.embed

    def note(count: str, n: int, seconds: str, t: float) -> None:
        with lock:
            runs[count] += n
            runs[seconds] += time.perf_counter() - t

    def counted_detect(rgb):
        t = time.perf_counter()
        out = detect(rgb)
        note("detections", 1, "detect s", t)
        return out

    def counted_embed(rgb, faces):
        t = time.perf_counter()
        out = embed(rgb, faces)
        note("faces", len(faces), "embed s", t)
        return out

    stage.detector.detect, stage.embedder.embed = counted_detect, counted_embed
    try:
        yield runs
    finally:
        del stage.detector.detect, stage.embedder.embed  # back to the class's methods


def print_providers() -> None:
    import onnxruntime as ort

    print(f"  onnxruntime {ort.__version__}, available providers: "
          f"{', '.join(ort.get_available_providers())}")
    for name, providers in loaded_sessions():
        print(f"    {name}: {', '.join(providers)}")


# -- the ComfyUI batch -----------------------------------------------------------------------
def node_batch(engine: Engine, batch: np.ndarray) -> dict:
    """What ConsentGuardCheckImage does with an IMAGE batch (float B x H x W x 3 in 0..1),
    stage by stage, without ComfyUI: frames, check, the picture shown, back to floats."""
    from consent_guard.imageio import uint8_to_float01

    t = {}
    frames, t["frames"] = timed(list, batch)
    verdicts, t["check"] = timed(engine.check_images, frames)
    shown, t["render"] = timed(lambda: [engine.output_for(f, v)
                                        for f, v in zip(frames, verdicts)])
    _, t["to float"] = timed(uint8_to_float01, shown)
    return t


def batch_case(engine: Engine, files: Sequence[Path], rounds: int) -> None:
    pictures = [Image.open(f).convert("RGB") for f in files[:BATCH]]
    for side in (1024, 2048):
        batch = np.stack([np.asarray(ImageOps.fit(p, (side, side))) for p in pictures])
        batch = batch.astype(np.float32) / 255.0
        per_image = {}
        for count in (1, BATCH):
            part = batch[:count]
            node_batch(engine, part)  # warm
            runs = [node_batch(engine, part) for _ in range(rounds)]
            per_image[count] = {k: statistics.median(r[k] for r in runs) / count
                                for k in runs[0]}
        one, many = (sum(per_image[c].values()) for c in (1, BATCH))
        print(f"  {side} px: 1 image {1000 * one:.1f} ms, batch of {BATCH} "
              f"{1000 * many:.1f} ms/image, ratio {many / one:.2f}x")
        for k in per_image[1]:
            print(f"    {k:10} {1000 * per_image[1][k]:7.1f} ms (1)   "
                  f"{1000 * per_image[BATCH][k]:7.1f} ms/image ({BATCH})")
        conversion(batch, rounds)


def conversion(batch: np.ndarray, rounds: int) -> None:
    """float -> uint8 of one frame: to_rgb_uint8 against the whole-array expression it
    replaces (bit-identical), interleaved."""
    frame = batch[0]

    def whole():
        np.isfinite(frame).all()
        return (np.clip(frame, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    assert np.array_equal(whole(), to_rgb_uint8(frame))
    ours, ref = interleaved(lambda: to_rgb_uint8(frame), whole, max(rounds, 5))
    print(f"    float -> uint8 of one {frame.shape[1]} px frame: {1000 * ours:.1f} ms, "
          f"whole-array {1000 * ref:.1f} ms, ratio {ours / ref:.2f}x (bit-identical)")


def check_case(a, engine: Engine, files: Sequence[Path], registry_path: Optional[Path],
               reference, target: float) -> None:
    """One case: decisions (and their agreement with --baseline), the ratio to NudeNet's own
    detector, and with --stages where the time goes."""
    engine.load()
    now = decisions(engine, files)
    blocked = sum(v["decision"] == "block" for v in now.values())
    print(f"  {blocked} of {len(files)} blocked" + (" (photos of the enrolled people)"
                                                    if registry_path else ""))
    if a.baseline != "none":
        print_agreement(a.baseline, now, baseline_outcomes(
            a.baseline, files, registry_path, a.rounds if a.baseline_timing else 0))
    against_nudenet("full check", engine, files, reference, a.rounds, target)
    if a.stages and registry_path:
        with no_copy_search():
            against_nudenet("the same without the turned/cleaned copies' search (a floor: what "
                            "reading the faces as they are costs)", engine, files, reference,
                            a.rounds, target)
    if a.stages and registry_path:
        beside_or_after(engine, files, a.rounds)
    if a.stages:
        stage_times(engine, files)


def beside_or_after(engine: Engine, files: Sequence[Path], rounds: int) -> None:
    """The check as it runs (the identity check beside the explicit models: Engine._faces_ahead)
    against the same check with the identity check after them, as before, interleaved in
    this process (a ratio two processes run at different times cannot give on a machine whose
    load changes), and whether any decision differs between the two."""
    def after():
        for f in files:
            serial.check_file(f)

    def beside():
        for f in files:
            engine.check_file(f)

    serial = engine.with_policy(engine.policy)
    serial._faces_ahead = lambda *a, **k: None  # type: ignore[method-assign]
    same = sum(outcome(engine.check_file(f)) == outcome(serial.check_file(f)) for f in files)
    t_beside, t_after = interleaved(beside, after, rounds)
    n = len(files)
    print(f"  the identity check beside the explicit models {1000 * t_beside / n:.1f} ms/image, "
          f"after them {1000 * t_after / n:.1f} ms/image: {t_beside / t_after:.2f}x "
          f"(median of {rounds} interleaved rounds; {same} of {n} outcomes the same)")


@contextmanager
def no_copy_search():
    """The face stage's turned and cleaned copies switched off while inside (for the floor
    under the faces target: no change to that search can make a check cheaper than this)."""
    import consent_guard.engine as engine_module
    import consent_guard.faces.stage as stage_module

    saved = engine_module.turned_findings, stage_module.turned_findings
    engine_module.turned_findings = stage_module.turned_findings = lambda *a, **k: []
    try:
        yield
    finally:
        engine_module.turned_findings, stage_module.turned_findings = saved


# -- main ------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default="explicit,faces,batch")
    ap.add_argument("--stages", action="store_true", help="per-stage times and providers")
    ap.add_argument("--baseline", default="HEAD", help="git ref to compare decisions with, "
                    "or 'none'")
    ap.add_argument("--baseline-timing", action="store_true", help="also time the code at "
                    "--baseline against NudeDetector.detect (in its own process)")
    a = ap.parse_args()
    shared = Path(a.shared)
    files = benign_files(shared)
    if not files:
        print(f"no evaluation images under {shared}/eval: this benchmark needs ../shared",
              file=sys.stderr)
        return 2
    reference = nudenet_reference()
    if reference is None:
        return 2
    cases = set(a.cases.split(","))
    print(f"data: {shared}/eval; {os.cpu_count()} CPUs visible")

    if "explicit" in cases:
        print(f"\nexplicit: {len(files)} benign images, nobody enrolled")
        check_case(a, Engine(), files, None, reference, 1.0)

    if "faces" in cases:
        with tempfile.TemporaryDirectory(prefix="cg-speed-") as tmp:
            registry_path = Path(tmp) / "identities.db"
            registry = make_registry(registry_path, first_photos(shared, ENROLLED))
            faces = face_files(shared)
            print(f"\nfaces: {len(faces)} deepface photos, {ENROLLED} identities enrolled")
            check_case(a, Engine(registry=registry), faces, registry_path, reference, 1.5)
            registry.close()

    if "batch" in cases:
        engine = Engine()
        engine.load()
        print(f"\nbatch: the ComfyUI node's path, benign images fitted to squares")
        batch_case(engine, files, a.rounds)

    if a.stages:
        print("\nsessions")
        print_providers()
    print("\nNote: timings on a shared machine are noisy; compare ratios from one run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
