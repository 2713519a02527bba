"""Which face backend runs: YuNet + SFace by default, an InsightFace pack when present.

The default backend keeps the name "opencv" (policy `[faces] backend = "opencv"`, enrolment
records) although onnxruntime now runs it (yunet_sface.py): renaming it would break policies.

A backend is a detector and an embedder. The embedder decides which stored embeddings can be
matched (an embedding is only ever compared with embeddings of the same model), so `auto` only
moves to InsightFace when everyone enrolled has embeddings from it; otherwise it stays on SFace
and says who must be re-enrolled to move.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..models import ModelError, ModelResolver
from ..policy import Policy
from .base import FaceDetector, FaceEmbedder


@dataclass
class FaceBackend:
    name: str  # "opencv" or "insightface:<pack>"
    detector: FaceDetector
    embedder: FaceEmbedder


def model_kind(model_id: str) -> str:
    """"sface-ab12..." -> "sface": the key of [faces.thresholds]."""
    return model_id.split("-", 1)[0]


def _with_threshold(backend: FaceBackend, policy: Policy) -> FaceBackend:
    kind = model_kind(backend.embedder.model_id)
    if kind in policy.face_thresholds:
        backend.embedder.threshold = policy.face_thresholds[kind]
    return backend


def opencv_backend(policy: Policy, resolver: ModelResolver) -> FaceBackend:
    from .yunet_sface import load_yunet_sface

    detector, embedder = load_yunet_sface(resolver, policy.device)
    return _with_threshold(FaceBackend("opencv", detector, embedder), policy)


def insightface_backend(policy: Policy, insightface_dirs: Sequence[Path]
                        ) -> Optional[FaceBackend]:
    """The configured InsightFace pack, or None when no complete pack is found."""
    if not insightface_dirs:
        return None
    from .insightface import find_pack, load_insightface

    pack = find_pack(list(insightface_dirs), policy.insightface_pack)
    if pack is None:
        return None
    detector, embedder = load_insightface(pack, policy.device)
    return _with_threshold(FaceBackend(f"insightface:{pack.name}", detector, embedder), policy)


def available_backends(policy: Policy, resolver: ModelResolver,
                       insightface_dirs: Sequence[Path]) -> Tuple[List[FaceBackend], List[str]]:
    """Every backend that loads here, and why the others do not (for enrolment, which stores
    an embedding from each so that switching backend later needs no re-enrolment)."""
    backends, problems = [], []
    for make in (lambda: insightface_backend(policy, insightface_dirs),
                 lambda: opencv_backend(policy, resolver)):
        try:
            b = make()
        except ModelError as exc:
            problems.append(str(exc))
            continue
        if b is not None:
            backends.append(b)
    return backends, problems


def choose_backend(policy: Policy, resolver: ModelResolver, insightface_dirs: Sequence[Path],
                   enrolled: Dict[str, Set[str]]) -> Tuple[FaceBackend, List[str]]:
    """The backend to match with, and notes for the admin. `enrolled` maps each identity's
    display label to the model_ids it has embeddings from."""
    notes: List[str] = []
    if policy.face_backend == "opencv":
        backend = opencv_backend(policy, resolver)
    elif policy.face_backend == "insightface":
        backend = insightface_backend(policy, insightface_dirs)
        if backend is None:
            raise ModelError(
                f"[faces] backend = \"insightface\" but no InsightFace pack "
                f"({policy.insightface_pack}) with a detector and a recognizer was found in: "
                + (", ".join(str(d) for d in insightface_dirs) or "no folder given")
                + ". Put the pack (e.g. buffalo_l) in ComfyUI's models/insightface/models/, "
                  "or set backend = \"opencv\".")
    else:
        try:
            backend = insightface_backend(policy, insightface_dirs)
        except ModelError as exc:
            notes.append(f"InsightFace pack not usable, using YuNet + SFace: {exc}")
            backend = None
        if backend is not None:
            missing = uncovered(backend, enrolled)
            if missing:
                notes.append(f"{backend.name} is available but {len(missing)} protected "
                             f"people have no embeddings from it ({', '.join(missing)}); "
                             f"matching stays on SFace until they are re-enrolled.")
                backend = None
        if backend is None:
            backend = opencv_backend(policy, resolver)
    missing = uncovered(backend, enrolled)
    if missing:
        notes.append(f"NOT PROTECTED by {backend.name}: {', '.join(missing)} "
                     f"(enrolled with another face model). Re-enrol them with "
                     f"`consent-guard identity add-photos`, or change [faces] backend.")
    return backend, notes


def uncovered(backend: FaceBackend, enrolled: Dict[str, Set[str]]) -> List[str]:
    return sorted(label for label, models in enrolled.items()
                  if backend.embedder.model_id not in models)
