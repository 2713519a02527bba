"""What enforce mode's source checks and the turned-copy face search cost, and what they catch.

    python bench/enforce_sources.py [--shared PATH] [--rounds N]

Data: ../shared/eval/faces/deepface (65 adult face photos in identity clusters) and
../shared/eval/images (benign photos without those people). Prints:

1. Turned copies. Every deepface cluster is enrolled (scope `any`) from its first photo with
   the default face models; each other photo of the cluster is a probe, upright, turned 90 /
   180 / 270 degrees and colour-inverted. For each: the share the output check blocks, with
   the upright search only (as before) and with the turned and cleaned copies (now); also
   turned and inverted together, a grid of 1 px lines every 24 px, Gaussian noise sigma 40,
   a 45 degree tilt, squashed to half height (what a second red team got past matching). Also how many of
   the benign photos (none of these people) are blocked with the turned search (target 0).
2. Its cost: the full output check per image, 10 identities enrolled, turned search on
   against off, as a ratio (interleaved rounds, same process).
3. Source checks (nodes/sources.py), through the real hooks on stand-ins of ComfyUI's
   execution (tests/comfy_standins.py) and the real models, no one enrolled:
   - txt2img-shaped: VAEDecode -> SaveImage;
   - img2img-shaped: LoadImage -> VAEEncode -> (sampling) -> VAEDecode -> SaveImage;
   time per image (checks, the stand-in saver's PNG writing; no model runs) as a ratio to the
   same graph with only what enforce mode checked before (the saver's input, LoadImage's
   input rule), measured in the same run.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from consent_guard import Engine, Policy  # noqa: E402
from consent_guard.faces.backends import opencv_backend  # noqa: E402
from consent_guard.faces.stage import detect_faces  # noqa: E402
from consent_guard.models import ModelResolver  # noqa: E402
from consent_guard.registry import Consent, Registry  # noqa: E402

import consent_guard.engine as engine_module  # noqa: E402

TRANSFORMS = {
    "upright": lambda rgb: rgb,
    "rot90": lambda rgb: np.ascontiguousarray(np.rot90(rgb, 1)),
    "rot180": lambda rgb: np.ascontiguousarray(np.rot90(rgb, 2)),
    "rot270": lambda rgb: np.ascontiguousarray(np.rot90(rgb, 3)),
    "inverted": lambda rgb: 255 - rgb,
    "rot90+inv": lambda rgb: 255 - np.ascontiguousarray(np.rot90(rgb, 1)),
    "rot180+inv": lambda rgb: 255 - np.ascontiguousarray(np.rot90(rgb, 2)),
    "grid24": lambda rgb: _grid(rgb, 24),
    "noise40": lambda rgb: np.clip(rgb + np.random.default_rng(0).normal(0, 40, rgb.shape),
                                   0, 255).astype(np.uint8),
    "tilt45": lambda rgb: np.asarray(Image.fromarray(rgb).rotate(45, expand=True)),
    "squash2": lambda rgb: np.asarray(Image.fromarray(rgb).resize(
        (rgb.shape[1], rgb.shape[0] // 2))),
}


def _grid(rgb, step):
    out = rgb.copy()
    out[::step], out[:, ::step] = 0, 0
    return out


def load(path: Path, side: int = 768) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    img.thumbnail((side, side))
    return np.asarray(img)


def clusters(deepface: Path):
    out = defaultdict(list)
    for row in csv.DictReader(open(deepface / "identities.csv")):
        if row["cluster_id"].startswith("id"):
            out[row["cluster_id"]].append(row["file"])
    return {c: sorted(files) for c, files in out.items() if len(files) >= 2}


def enrol(reg: Registry, backend, name: str, rgb: np.ndarray) -> bool:
    faces = detect_faces(backend.detector, rgb)
    if not faces:
        return False
    face = max(faces, key=lambda f: f.box[2] * f.box[3])
    vec = backend.embedder.embed(rgb, [face])
    reg.add(name, "any", Consent(name), {backend.embedder.model_id: vec})
    return True


class turns_off:
    """The output check as it was: upright faces only."""

    def __enter__(self):
        self.saved = engine_module.turned_findings
        engine_module.turned_findings = lambda *a, **k: []

    def __exit__(self, *exc):
        engine_module.turned_findings = self.saved


def turned_copies(shared: Path, rounds: int) -> None:
    deepface = shared / "eval" / "faces" / "deepface"
    groups = clusters(deepface)
    policy = Policy()
    backend = opencv_backend(policy, ModelResolver(policy.model_paths, []))
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry.create(Path(tmp) / "identities.db", "bench passphrase")
        probes = []
        for c, files in groups.items():
            if enrol(reg, backend, c, load(deepface / "images" / files[0])):
                probes += [load(deepface / "images" / f) for f in files[1:]]
        enrolled = len(reg.identities())
        engine = Engine(policy, registry=reg, face_backend=backend)
        engine.load()
        print(f"1. turned copies: {enrolled} people enrolled (scope any), {len(probes)} probe "
              f"photos of them (not the enrolment photos)")
        print(f"   {'probe':<10}{'blocked before':>16}{'blocked now':>14}")
        for name, fn in TRANSFORMS.items():
            shown = [fn(p) for p in probes]
            with turns_off():
                before = sum(not v.allowed for v in engine.check_images(shown))
            now = sum(not v.allowed for v in engine.check_images(shown))
            print(f"   {name:<10}{before:>10}/{len(shown):<5}{now:>9}/{len(shown):<5}")
        benign = sorted((shared / "eval" / "images").glob("*/*"))
        benign = [load(f) for f in benign if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
        blocked = sum(not v.allowed for v in engine.check_images(benign))
        print(f"   benign photos of other people and things blocked now: {blocked}/{len(benign)}")

        # 2. cost with 10 enrolled
        reg2 = Registry.create(Path(tmp) / "ten.db", "bench passphrase")
        for c, files in list(groups.items())[:10]:
            enrol(reg2, backend, c, load(deepface / "images" / files[0]))
        engine2 = Engine(policy, registry=reg2, face_backend=backend)
        engine2.load()
        images = benign + probes
        engine2.check_images(images[:2])  # warm
        on, off = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            with turns_off():
                engine2.check_images(images)
            off.append(time.perf_counter() - t)
            t = time.perf_counter()
            engine2.check_images(images)
            on.append(time.perf_counter() - t)
        n = len(images)
        print(f"2. cost, {len(reg2.identities())} enrolled, {n} images, {rounds} rounds: "
              f"upright only {1000 * statistics.median(off) / n:.0f} ms/image, with turned "
              f"copies {1000 * statistics.median(on) / n:.0f} ms/image: "
              f"{statistics.median(on) / statistics.median(off):.2f}x")
        reg.close()
        reg2.close()


# -- 3. source checks through the hooks ---------------------------------------------------------

class _Patch:
    """What comfy_standins.install needs of pytest's monkeypatch."""

    def setitem(self, mapping, key, value):
        mapping[key] = value

    def delitem(self, mapping, key, raising=True):
        mapping.pop(key, None)


def source_checks(shared: Path, rounds: int) -> None:
    import torch

    import comfy_standins

    tmp = Path(tempfile.mkdtemp())
    import os

    os.environ["CONSENT_GUARD_HOME"] = str(tmp / "home")
    (tmp / "home").mkdir()
    (tmp / "home" / "policy.toml").write_text("enforce = true\n")
    server = comfy_standins.make_server()
    pkg = comfy_standins.install(_Patch(), tmp / "comfy", server=server, core=True)
    bridge = sys.modules[pkg.__name__ + ".nodes.comfy_bridge"]
    sources = sys.modules[pkg.__name__ + ".nodes.sources"]
    enforce = sys.modules[pkg.__name__ + ".nodes.enforce"]
    image_nodes = sys.modules[pkg.__name__ + ".nodes.image_nodes"]
    engine = bridge.get_engine()
    engine.load()
    execution, nodes = sys.modules["execution"], sys.modules["nodes"]

    files = sorted((shared / "eval" / "images").glob("*/*"))
    pictures = [load(f, 1024) for f in files if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
    tensors = [torch.from_numpy(p.astype(np.float32) / 255)[None] for p in pictures]
    decoded = [torch.clamp(t + 1.0 / 255, 0, 1) for t in tensors]  # what a decoder returns

    class VAEEncode:
        FUNCTION, RETURN_TYPES = "encode", ("LATENT",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

        def encode(self, pixels, vae):
            return ({"samples": torch.zeros((1, 4, 8, 8))},)

    def node(cls, **inputs):
        return asyncio.run(execution.get_output_data("bench", "1", cls(),
                                                     {k: [v] for k, v in inputs.items()}))

    def txt2img(i):
        made = node(nodes.NODE_CLASS_MAPPINGS["VAEDecode"], samples={"samples": None},
                    vae=lambda s: decoded[i])[0][0][0]
        node(nodes.SaveImage, images=made, filename_prefix="bench")

    def load_now(i):  # what the LoadImage hook checks now: the picture and its (flat) mask
        sources.check_picture("IMAGE", tensors[i], "LoadImage", allow_censor=True)
        sources.check_picture("MASK", torch.zeros((1, 64, 64)), "LoadImage")

    def load_before(i):  # what it checked before: the input rule only
        image_nodes.check_inputs(engine, tensors[i], "LoadImage")

    def img2img(i, loader):
        loader(i)
        node(VAEEncode, pixels=tensors[i], vae=None)
        txt2img(i)

    class before:
        """The same graph with only what enforce mode checked before this change: the
        savers' inputs and LoadImage's input check (no source checks)."""

        def __enter__(self):
            self.saved = sources.check_inputs, sources.check_outputs
            sources.check_inputs = lambda cls, data, where, pure=False: (data, True)
            sources.check_outputs = lambda cls, output, run, has_subgraph=False: output

        def __exit__(self, *exc):
            sources.check_inputs, sources.check_outputs = self.saved

    def timed(fn):
        sources.CACHE.clear()
        sources.DERIVED.clear()
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        return (time.perf_counter() - t) / n

    n = len(tensors)
    times = defaultdict(list)
    for _ in range(rounds):
        with before():
            times["before txt2img"].append(timed(txt2img))
            times["before img2img"].append(timed(lambda i: img2img(i, load_before)))
        times["now txt2img"].append(timed(txt2img))
        times["now img2img"].append(timed(lambda i: img2img(i, load_now)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"3. source checks, {n} benign images at up to 1024 px, nobody enrolled, "
          f"{rounds} rounds (median ms/image):")
    for graph in ("txt2img", "img2img"):
        print(f"   {graph}: before {1000 * med['before ' + graph]:.0f} ms, now "
              f"{1000 * med['now ' + graph]:.0f} ms: "
              f"{med['now ' + graph] / med['before ' + graph]:.2f}x")
    assert enforce.enforce_on()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-faces", action="store_true")
    ap.add_argument("--skip-sources", action="store_true")
    a = ap.parse_args()
    shared = Path(a.shared)
    if not (shared / "eval").is_dir():
        print(f"no evaluation data at {shared / 'eval'}", file=sys.stderr)
        return 2
    if not a.skip_faces:
        turned_copies(shared, a.rounds)
    if not a.skip_sources:
        source_checks(shared, a.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
