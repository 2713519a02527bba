"""The provenance mark on benign images: how faint, what it survives, false finds, and cost.

    python bench/provenance.py [--shared PATH] [--step K] [--limit N] [--rounds N]

Data: ../shared/eval/images (skimage + darknet samples) and ../shared/eval/faces/deepface/images
(adult faces), each scaled to about 1 MP (a generator's usual output size). Two methods, both
carrying the same 32-bit payload (watermark.payload_bits: 16 tag bits + a 16-bit id):
  - rivagan: what Consent Guard uses (consent_guard/watermark.py: RivaGAN ONNX on a GRID px copy,
    read at READ_SCALES and the best reading kept);
  - rivagan_before: the same on a 256 px copy read once (issue 15's first version), so one run
    prints before and after on the same images and the same loaded machine (--no-before: skip);
  - dwtdct: invisible-watermark's default "dwtDct" method (imwatermark/maxDct.py), rewritten
    here in numpy (a Haar DWT of the U channel, 4x4 blocks, the largest AC value quantised
    with step 36), measured only to compare: it is not in the product.
Prints, per method: PSNR of marked vs original; bit accuracy and detection rate (found, and
found with the right id) after each transformation: none, JPEG q50, half size, 80% centre
crop, screenshot-like rescale (0.77x bilinear, PNG), mild blur (Gaussian radius 1); false
finds on the unmarked images under the same transformations (target 0 of all); and the time to
embed and to read per 1 MP image as a ratio to the explicit check (Engine.check_image) of the
same image in the same process, rounds interleaved (target: embed <= 0.5x).
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from consent_guard import Engine  # noqa: E402
from consent_guard.watermark import Marker, payload_bits, read_payload  # noqa: E402

MEGAPIXEL = 1024 * 1024


def benign_files(shared: Path):
    eval_dir = shared / "eval"
    files = sorted((eval_dir / "images").glob("*/*")) + sorted(
        (eval_dir / "faces" / "deepface" / "images").glob("*"))
    return [f for f in files if f.suffix.lower() in (".jpg", ".jpeg", ".png")]


def at_one_megapixel(path: Path) -> np.ndarray:
    im = Image.open(path).convert("RGB")
    scale = (MEGAPIXEL / (im.width * im.height)) ** 0.5
    return np.asarray(im.resize((max(1, round(im.width * scale)),
                                 max(1, round(im.height * scale))), Image.BICUBIC))


# -- the transformations images meet when shared ------------------------------------------------

def _pil(a):
    return Image.fromarray(a)


def jpeg50(a):
    buf = io.BytesIO()
    _pil(a).save(buf, "JPEG", quality=50)
    return np.asarray(Image.open(buf).convert("RGB"))


def half(a):
    return np.asarray(_pil(a).resize((a.shape[1] // 2, a.shape[0] // 2), Image.BICUBIC))


def crop80(a):
    h, w = a.shape[:2]
    dy, dx = round(h * 0.1), round(w * 0.1)
    return a[dy:h - dy, dx:w - dx]


def screenshot(a):
    return np.asarray(_pil(a).resize((round(a.shape[1] * 0.77), round(a.shape[0] * 0.77)),
                                     Image.BILINEAR))


def blur(a):
    return np.asarray(_pil(a).filter(ImageFilter.GaussianBlur(1)))


TRANSFORMS = {"none": lambda a: a, "jpeg_q50": jpeg50, "half_size": half, "crop_80": crop80,
              "screenshot_0.77": screenshot, "blur_r1": blur}


# -- invisible-watermark's dwtDct, in numpy, for comparison ---------------------------------------

class DwtDct:
    """imwatermark/maxDct.py EmbedMaxDct (scales [0, 36, 36], block 4; its loop marks only the
    U channel): in the Haar approximation band of U, each 4x4 block carries bit k = block
    number mod 32 in its largest non-first value, quantised to (v // 36 + 0.25 + 0.5 bit) * 36."""
    SCALE, BLOCK = 36.0, 4

    @staticmethod
    def _yuv(rgb):
        r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
        y = 0.299 * r + 0.587 * g + 0.114 * b
        return y, 0.492 * (b - y) + 128.0, 0.877 * (r - y) + 128.0

    @staticmethod
    def _rgb(y, u, v):
        b = (u - 128.0) / 0.492 + y
        r = (v - 128.0) / 0.877 + y
        g = (y - 0.299 * r - 0.114 * b) / 0.587
        return np.clip(np.rint(np.stack([r, g, b], -1)), 0, 255).astype(np.uint8)

    def _blocks(self, u):
        """The Haar approximation band of u (cropped to a multiple of 4) as 4x4 blocks."""
        h, w = (u.shape[0] // 4) * 4, (u.shape[1] // 4) * 4
        x = u[:h, :w]
        ca = (x[0::2, 0::2] + x[0::2, 1::2] + x[1::2, 0::2] + x[1::2, 1::2]) / 2.0
        bh, bw = ca.shape[0] // self.BLOCK, ca.shape[1] // self.BLOCK
        blocks = ca[:bh * self.BLOCK, :bw * self.BLOCK].reshape(bh, self.BLOCK, bw, self.BLOCK)
        return ca, blocks.transpose(0, 2, 1, 3).reshape(bh * bw, self.BLOCK * self.BLOCK), (bh, bw)

    def embed(self, rgb, bits: str):
        y, u, v = self._yuv(rgb)
        ca, blocks, (bh, bw) = self._blocks(u)
        wm = np.array([int(b) for b in bits], np.float64)[np.arange(len(blocks)) % len(bits)]
        pos = np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1
        val = blocks[np.arange(len(blocks)), pos]
        mag = (np.abs(val) // self.SCALE + 0.25 + 0.5 * wm) * self.SCALE
        new = blocks.copy()
        new[np.arange(len(blocks)), pos] = np.where(val >= 0, mag, -mag)
        delta_blocks = (new - blocks).reshape(bh, bw, self.BLOCK, self.BLOCK).transpose(
            0, 2, 1, 3).reshape(bh * self.BLOCK, bw * self.BLOCK)
        delta = np.zeros_like(ca)
        delta[:delta_blocks.shape[0], :delta_blocks.shape[1]] = delta_blocks
        u = u.copy()
        up = np.repeat(np.repeat(delta / 2.0, 2, axis=0), 2, axis=1)  # inverse Haar of cA only
        u[:up.shape[0], :up.shape[1]] += up
        return self._rgb(y, u, v)

    def read(self, rgb):
        _, u, _ = self._yuv(rgb)
        _, blocks, _ = self._blocks(u)
        if len(blocks) == 0:
            return read_payload("0" * 32)
        pos = np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1
        val = np.abs(blocks[np.arange(len(blocks)), pos])
        ones = (val % self.SCALE) > 0.5 * self.SCALE
        k = np.arange(len(blocks)) % 32
        score = np.array([ones[k == i].mean() if np.any(k == i) else 0.0 for i in range(32)])
        return read_payload("".join("1" if s > 0.5 else "0" for s in score))


# -- measuring ------------------------------------------------------------------------------------

def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def measure(method, images, ids):
    """PSNRs, and per transformation: bit accuracies, found, found with the right id, and
    false finds on the unmarked image."""
    out = {"psnr": [], **{t: {"acc": [], "found": 0, "right": 0, "false": 0}
                          for t in TRANSFORMS}}
    for img, mark_id in zip(images, ids):
        bits = payload_bits(mark_id)
        marked = method.embed(img, bits)
        out["psnr"].append(psnr(marked, img))
        for name, fn in TRANSFORMS.items():
            got = method.read(fn(marked))
            row = out[name]
            row["acc"].append(sum(a == b for a, b in zip(got.bits, bits)) / 32)
            row["found"] += got.found
            row["right"] += got.found and got.mark_id == mark_id % 65536
            row["false"] += method.read(fn(img)).found
    return out


def timing(methods, engine, images, rounds):
    """Median over images of (method time / explicit check time), rounds interleaved."""
    ratios = {f"{m}_{op}": [] for m in methods for op in ("embed", "read")}
    check_ms = []
    for _ in range(rounds):
        for img in images:
            t0 = time.perf_counter()
            engine.check_image(img)
            base = time.perf_counter() - t0
            check_ms.append(base * 1000)
            for name, method in methods.items():
                t0 = time.perf_counter()
                marked = method.embed(img, payload_bits(1))
                t1 = time.perf_counter()
                method.read(marked)
                t2 = time.perf_counter()
                ratios[f"{name}_embed"].append((t1 - t0) / base)
                ratios[f"{name}_read"].append((t2 - t1) / base)
    return statistics.median(check_ms), {k: statistics.median(v) for k, v in ratios.items()}


def report(name, result, n):
    print(f"\n{name}: PSNR median {statistics.median(result['psnr']):.1f} dB "
          f"(min {min(result['psnr']):.1f}) on {n} images")
    print(f"  {'transformation':16} {'bit acc':>8} {'found':>7} {'right id':>9} "
          f"{'false finds (unmarked)':>24}")
    for t in TRANSFORMS:
        row = result[t]
        print(f"  {t:16} {statistics.mean(row['acc']):8.3f} {row['found']:4}/{n:<3}"
              f"{row['right']:5}/{n:<4}{row['false']:13}/{n}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--limit", type=int, default=0, help="use the first N images only")
    ap.add_argument("--step", type=int, default=1, help="use every STEP-th image (a spread "
                                                        "subset on a busy machine)")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds")
    ap.add_argument("--timing-images", type=int, default=8)
    ap.add_argument("--no-before", action="store_true",
                    help="skip rivagan_before (the 256 px grid read at one scale)")
    a = ap.parse_args()
    files = benign_files(Path(a.shared))[::max(1, a.step)]
    if a.limit:
        files = files[:a.limit]
    if not files:
        print(f"no evaluation images under {a.shared}/eval: nothing to measure (skipped)",
              file=sys.stderr)
        return 0
    images = [at_one_megapixel(f) for f in files]
    ids = list(np.random.default_rng(15).integers(0, 1 << 20, len(images)))
    methods = {"rivagan": Marker(device="cpu"), "dwtdct": DwtDct()}
    if not a.no_before:
        methods["rivagan_before"] = Marker(device="cpu", grid=256, read_scales=(1.0,))
    print(f"{len(images)} benign images from {a.shared}/eval, each scaled to ~1 MP; rivagan: "
          f"grid {methods['rivagan'].grid}, read at {methods['rivagan'].read_scales}")
    for name, method in methods.items():
        report(name, measure(method, images, ids), len(images))
    engine = Engine()
    engine.check_image(images[0])  # load the models before timing
    check_ms, ratios = timing(methods, engine, images[:a.timing_images], a.rounds)
    print(f"\ntime per 1 MP image as a ratio to the explicit check ({check_ms:.0f} ms median, "
          f"CPU), {a.rounds} interleaved rounds on {min(len(images), a.timing_images)} images:")
    for key, value in ratios.items():
        print(f"  {key:16} {value:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
