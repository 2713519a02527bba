"""Kept so that old imports keep working: the default face backend (YuNet + SFace) now runs on
onnxruntime and lives in yunet_sface.py. OpenCV is no longer needed for it."""
from __future__ import annotations

from .yunet_sface import SFACE_THRESHOLD, SFaceEmbedder, YuNetDetector, load_yunet_sface

__all__ = ["SFACE_THRESHOLD", "SFaceEmbedder", "YuNetDetector", "load_yunet_sface"]
