"""The turned and cleaned copies' face search (consent_guard/faces/stage.py turned_findings):
what it catches and what it costs, now against the code at a git ref, in one process.

    python bench/face_search.py [--shared PATH] [--ref HEAD] [--step 1] [--rounds 2]
                                [--side 768] [--canvas N] [--skip-red-team]
                                [--only-red-team] [--only-sizes]

1. Red team. Every deepface cluster with 2+ photos is enrolled (scope any) from its first photo
   (768 px, as bench/enforce_sources.py); each other photo is a probe under each of that
   bench's transforms (turned, inverted, grid, noise, tilt, squash), made from the photo cut
   down to at most --side px (768 as that bench; a larger side keeps large photos large, so
   that the finer detection copy of a large picture is searched too). A probe matched upright
   needs no search; for the others, the identities turned_findings returns, at --ref and now:
   the counts, and every probe where they differ. --canvas N pastes each probe (cut down to
   --side px) on a grey N px picture: small faces in a large picture (`--side 160 --canvas
   1600`: faces of about 50 px, which the search's cheap pass missed at 320 px).
2. Benign. The 90 benign images of bench/images.py, 10 identities enrolled (bench/speed.py's
   registry): the engine's outcome (decision, labels, identities) with --ref's turned_findings
   and with today's, and the time of each (interleaved rounds, same process: a ratio).
3. By size. The search alone on 4 deepface photos nobody enrolled matches (so every copy is
   searched), resized to 800, 1024, 2048 and 3072 px: ms a photo at --ref and now, and the
   ratio; then the work counted (detector runs and megapixels, megapixels resized, faces
   embedded), which no other process on the machine can blur.

--step N takes every Nth probe (a quicker, smaller run). Needs ../shared/eval (exits 2
without it) and git (the code at --ref is read with `git show`).
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import consent_guard.engine as engine_module  # noqa: E402
from consent_guard import Engine, Policy  # noqa: E402
from consent_guard.faces import stage as stage_now  # noqa: E402
from consent_guard.faces.backends import opencv_backend  # noqa: E402
from consent_guard.models import ModelResolver  # noqa: E402
from consent_guard.registry import Registry  # noqa: E402


def stage_at(ref: str):
    """consent_guard/faces/stage.py as it is at git `ref`, loaded beside today's."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:consent_guard/faces/stage.py"],
                            check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("consent_guard.faces._stage_at_ref", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "consent_guard.faces"
    exec(compile(source, f"{ref}:stage.py", "exec"), module.__dict__)
    return module


def search(module, stage, rgb, to_full=1.0, copies=None, seen=()):
    """`module`'s turned_findings, handed the upright faces (`seen`) when it takes them: the
    code at an older ref does not."""
    if "seen" in inspect.signature(module.turned_findings).parameters:
        return module.turned_findings(stage, rgb, to_full, copies, seen=seen)
    return module.turned_findings(stage, rgb, to_full)


def upright_faces(stage, rgb) -> list:
    """The faces the upright search embeds (FaceStage.findings), the search's `seen`."""
    return stage.matchable(stage_now.detect_faces(stage.detector, rgb, stage.detect_size,
                                                  stage.min_face_px))


def identities(findings) -> list:
    return sorted(f.identity for f in findings if f.identity)


def on_canvas(rgb: np.ndarray, canvas: int) -> np.ndarray:
    """`rgb` pasted on a grey `canvas` px square (a third of the way across, a quarter down),
    or `rgb` itself when `canvas` is 0."""
    if not canvas:
        return rgb
    from PIL import Image

    out = Image.new("RGB", (canvas, canvas), (120, 130, 125))
    out.paste(Image.fromarray(rgb), (canvas // 3, canvas // 4))
    return np.asarray(out)


def red_team(shared: Path, before, step: int, side: int = 768, canvas: int = 0) -> None:
    import enforce_sources as es  # bench/enforce_sources.py: its data and transforms

    deepface = shared / "eval" / "faces" / "deepface"
    policy = Policy()
    backend = opencv_backend(policy, ModelResolver(policy.model_paths, []))
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry.create(Path(tmp) / "identities.db", "bench passphrase")
        probes = []
        for cluster, files in es.clusters(deepface).items():
            if es.enrol(reg, backend, cluster, es.load(deepface / "images" / files[0])):
                probes += [on_canvas(es.load(deepface / "images" / f, side), canvas)
                           for f in files[1:]]
        probes = probes[::step]
        engine = Engine(policy, registry=reg, face_backend=backend)
        engine.load()
        stage = engine.face_stage()
        print(f"1. red team: {len(reg.identities())} enrolled, {len(probes)} probes each way "
              f"(at most {side} px" + (f", on a {canvas} px canvas" if canvas else "")
              + f", long side up to {max(max(p.shape[:2]) for p in probes)})")
        print(f"   {'probe':<11}{'upright':>8}{'before':>8}{'now':>6}  differs")
        spent = {"before": 0.0, "now": 0.0}
        for name, transform in es.TRANSFORMS.items():
            upright = caught_before = caught_now = 0
            differs = []
            for i, probe in enumerate(probes):
                rgb = transform(probe)
                faces = upright_faces(stage, rgb)
                if identities(stage.match(rgb, faces)):
                    upright += 1
                    continue
                t = time.perf_counter()
                old = identities(search(before, stage, rgb, seen=faces))
                spent["before"] += time.perf_counter() - t
                t = time.perf_counter()
                new = identities(search(stage_now, stage, rgb, seen=faces))
                spent["now"] += time.perf_counter() - t
                caught_before += bool(old)
                caught_now += bool(new)
                if old != new:
                    differs.append(f"#{i}: {old or '-'} -> {new or '-'}")
            print(f"   {name:<11}{upright:>8}{upright + caught_before:>8}"
                  f"{upright + caught_now:>6}  {', '.join(differs) or 'none'}")
        print(f"   search time (one pass each, not interleaved): before {spent['before']:.1f} s, "
              f"now {spent['now']:.1f} s")
        reg.close()


def benign(shared: Path, before, rounds: int) -> None:
    import speed  # bench/speed.py: its registry of 10
    from images import benign_files

    files = benign_files(shared)
    with tempfile.TemporaryDirectory() as tmp:
        reg = speed.make_registry(Path(tmp) / "ten.db", speed.first_photos(shared, 10))
        engine = Engine(registry=reg)
        engine.load()
        now_search = engine_module.turned_findings
        searches = {"before": lambda *args, **kw: search(before, *args, **kw),
                    "now": now_search}
        times = {"before": [], "now": []}
        outcomes = {}
        try:
            for r in range(rounds):
                order = ("before", "now") if r % 2 == 0 else ("now", "before")
                for name in order:
                    engine_module.turned_findings = searches[name]
                    t = time.perf_counter()
                    outcomes[name] = {str(f): speed.outcome(engine.check_file(f)) for f in files}
                    times[name].append(time.perf_counter() - t)
        finally:
            engine_module.turned_findings = now_search
        same = [f for f in outcomes["now"] if outcomes["now"][f] == outcomes["before"][f]]
        blocked = sum(o["decision"] == "block" for o in outcomes["now"].values())
        print(f"2. benign: {len(files)} images, 10 enrolled: {len(same)} of {len(files)} the same "
              f"outcome; {blocked} blocked now")
        for f in outcomes["now"]:
            if f not in same:
                print(f"   DIFFERS {Path(f).name}: before {outcomes['before'][f]}, "
                      f"now {outcomes['now'][f]}")
        b, n = statistics.median(times["before"]), statistics.median(times["now"])
        print(f"   whole check: before {1000 * b / len(files):.0f} ms/image, now "
              f"{1000 * n / len(files):.0f} ms/image: {n / b:.2f}x (median of {rounds} "
              f"interleaved rounds)")
        reg.close()


def by_size(shared: Path, before, rounds: int, sides=(800, 1024, 2048, 3072), n: int = 4
            ) -> None:
    """The search alone, at --ref and now, on the first `n` deepface photos nobody enrolled
    matches, resized to each of `sides` on the long side (interleaved rounds)."""
    import speed
    from PIL import Image, ImageOps

    with tempfile.TemporaryDirectory() as tmp:
        reg = speed.make_registry(Path(tmp) / "ten.db", speed.first_photos(shared, 10))
        engine = Engine(registry=reg)
        engine.load()
        stage = engine.face_stage()
        picks = []
        for f in speed.face_files(shared):
            img = ImageOps.exif_transpose(Image.open(f)).convert("RGB")
            rgb = np.asarray(img)
            if not identities(stage.match(rgb, upright_faces(stage, rgb))):
                picks.append(img)
            if len(picks) == n:
                break
        print(f"3. the search alone on {len(picks)} photos nobody enrolled matches (every copy "
              f"searched), by size")
        for side in sides:
            images = [np.asarray(img.resize((round(img.width * side / max(img.size)),
                                             round(img.height * side / max(img.size))),
                                            Image.Resampling.BICUBIC)) for img in picks]
            seen = [upright_faces(stage, rgb) for rgb in images]
            spent = {"before": [], "now": []}
            for r in range(rounds):
                for name in (("before", "now") if r % 2 == 0 else ("now", "before")):
                    module = before if name == "before" else stage_now
                    t = time.perf_counter()
                    for rgb, faces in zip(images, seen):
                        search(module, stage, rgb, seen=faces)
                    spent[name].append(time.perf_counter() - t)
            b, now = statistics.median(spent["before"]), statistics.median(spent["now"])
            print(f"   {side} px: before {1000 * b / len(images):.0f} ms, now "
                  f"{1000 * now / len(images):.0f} ms a photo: {now / b:.2f}x")
            for name, module in (("before", before), ("now", stage_now)):
                print(f"     {name:<7} a photo: " + ", ".join(
                    f"{v / len(images):.1f} {k}" for k, v in work(stage, module, images).items()))
        reg.close()


def work(stage, module, images) -> dict:
    """What `module`'s turned_findings does on `images`, counted rather than timed (a shared
    machine's timings are noisy): detector runs and the megapixels they are handed, the
    megapixels cut_down resizes, the faces embedded."""
    done = {"detector runs": 0, "Mpx detected": 0.0, "Mpx resized": 0.0, "faces embedded": 0}
    detect, embed, cut_down = stage.detector.detect, stage.embedder.embed, module.cut_down

    def counted_detect(rgb):
        done["detector runs"] += 1
        done["Mpx detected"] += rgb.shape[0] * rgb.shape[1] / 1e6
        return detect(rgb)

    def counted_embed(rgb, faces):
        done["faces embedded"] += len(faces)
        return embed(rgb, faces)

    def counted_cut_down(rgb, scale):
        done["Mpx resized"] += rgb.shape[0] * rgb.shape[1] / 1e6
        return cut_down(rgb, scale)

    seen = [upright_faces(stage, rgb) for rgb in images]  # not counted: the upright search's
    stage.detector.detect, stage.embedder.embed = counted_detect, counted_embed
    module.cut_down = counted_cut_down
    try:
        for rgb, faces in zip(images, seen):
            search(module, stage, rgb, seen=faces)
    finally:
        del stage.detector.detect, stage.embedder.embed  # the class's methods again
        module.cut_down = cut_down
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--ref", default="HEAD")
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--side", type=int, default=768, help="red-team probes at most this "
                    "large (px)")
    ap.add_argument("--canvas", type=int, default=0, help="paste the red-team probes on a "
                    "grey picture this large (px): small faces in a large picture")
    ap.add_argument("--skip-red-team", action="store_true")
    ap.add_argument("--only-red-team", action="store_true", help="part 1 alone")
    ap.add_argument("--only-sizes", action="store_true", help="part 3 alone")
    a = ap.parse_args()
    shared = Path(a.shared)
    if not (shared / "eval" / "faces" / "deepface").is_dir():
        print(f"{shared}/eval/faces/deepface is absent: this benchmark needs ../shared",
              file=sys.stderr)
        return 2
    before = stage_at(a.ref)
    if not a.only_sizes:
        if not a.skip_red_team:
            red_team(shared, before, a.step, a.side, a.canvas)
        if a.only_red_team:
            return 0
        benign(shared, before, a.rounds)
    by_size(shared, before, max(3, a.rounds))
    print("Note: timings on a shared machine are noisy; compare ratios from one run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
