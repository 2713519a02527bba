"""The prompt evaluation sets in ../shared/eval/prompts, loaded by path (never copied here).

Used by bench/prompts.py (evaluation) and bench/train_prompt_classifier.py (training). Which
rows may be used for training is decided here, once: `split(text)` puts a fixed 20% of every
set aside by a hash of the text, and whole sets are kept out of training entirely (see TRAIN).
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Dict, List

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "eval" / "prompts"

# The explicit subset of I2P. I2P's labels come from classifiers run on generated images, not
# from the text: of the 85 rows tagged `sexual` whose images were mostly nude
# (nudity_percentage >= 50), most are art or "sexy/shirtless/bikini" prompts that ask for
# nothing explicit in words ("figure with scenery. painting by gustave moreau"). I read all 85
# (`bench/prompts.py --show-subset 85` prints them) and kept the rows whose text asks for
# nudity or a sex act: an orgy, "no clothes" / "non-clothed", a porn act, "eroguro", an oral
# innuendo, the eggplant emoji, "nymphettes". They are listed by I2P's case_number.
EXPLICIT_NUDITY_AT = 50.0
EXPLICIT_CASES = ("1110", "1126", "1176", "2092", "2100", "2103", "3163", "3170", "3187")


def _csv(path: Path, column: str) -> List[str]:
    with open(path, newline="", encoding="utf-8") as fp:
        return [row[column] for row in csv.DictReader(fp) if row.get(column, "").strip()]


def i2p_rows() -> List[dict]:
    with open(DATA / "unsafe" / "i2p.csv", newline="", encoding="utf-8") as fp:
        return list(csv.DictReader(fp))


def sneaky_words() -> List[str]:
    text = (DATA / "unsafe" / "sneakyprompt_nsfw_words.txt").read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip()]


def i2p_explicit() -> List[str]:
    return [r["prompt"] for r in i2p_rows() if r["case_number"] in EXPLICIT_CASES]


def i2p_sexual_high_nudity() -> List[str]:
    """Every row tagged sexual whose images were mostly nude, whatever the text says."""
    return [r["prompt"] for r in i2p_rows() if "sexual" in r["categories"]
            and float(r["nudity_percentage"] or 0) >= EXPLICIT_NUDITY_AT]


def i2p_sexual(nudity_at: float = 25.0) -> List[str]:
    """Rows tagged sexual whose images were nude at least `nudity_at` % of the time: noisy
    (image labels), but written as whole prompts, which is what the classifier must learn."""
    return [r["prompt"] for r in i2p_rows() if "sexual" in r["categories"]
            and float(r["nudity_percentage"] or 0) >= nudity_at]


def i2p_not_sexual() -> List[str]:
    """Rows flagged for other harms only (violence, hate, ...) with no nude image: hard
    negatives for a sexual-content classifier."""
    return [r["prompt"] for r in i2p_rows() if "sexual" not in r["categories"]
            and float(r["nudity_percentage"] or 0) == 0.0]


def nudity_subset() -> List[str]:
    return _csv(DATA / "unsafe" / "i2p_nudity_subset.csv", "prompt")


def safe_sets() -> Dict[str, List[str]]:
    safe = DATA / "safe"
    with open(safe / "partiprompts.tsv", newline="", encoding="utf-8") as fp:
        parti = [r["Prompt"] for r in csv.DictReader(fp, delimiter="\t") if r["Prompt"].strip()]
    return {
        "PartiPrompts": parti,
        "DrawBench": json.loads((safe / "drawbench.json").read_text(encoding="utf-8")),
        "COCO 20k": _csv(safe / "coco_captions_20k.csv", "prompt"),
        "art": _csv(safe / "art_prompts.csv", "prompt"),
        "famous art": _csv(safe / "famous_art_prompts.csv", "prompt"),
        "ImageNet": _csv(safe / "imagenet_prompts.csv", "prompt"),
        "animals": [t for t in (safe / "animal_prompts.txt").read_text(
            encoding="utf-8").splitlines() if t.strip()],
    }


def held_out(text: str) -> bool:
    """A fixed 20% of every set never seen in training (hash of the text, no RNG)."""
    return hashlib.sha256(text.encode("utf-8")).digest()[0] < 52  # 52/256 = 20.3%


# Sets the classifier may learn from (their held-out 20% excepted). PartiPrompts, DrawBench,
# the art sets and the animal prompts are never used in training: they stand in for the
# unseen data the check will meet.
# SneakyPrompt's list is not used: single words taught the classifier that any one-word prompt
# ("bond", "molecule") is sexual (4% false positives on PartiPrompts); the lexicon covers words.
TRAIN_POSITIVE = ("i2p sexual, nudity >= 25%",)
TRAIN_NEGATIVE = ("COCO 20k", "ImageNet", "i2p not sexual")
