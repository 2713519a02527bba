"""The prompt evaluation sets in ../shared/eval/prompts, loaded by path (never copied here).

Used by bench/prompts.py (evaluation) and bench/train_prompt_classifier.py (training). Which
rows may be used for training is decided here, once: `held_out(text)` puts a fixed 20% of every
set aside by a hash of the text, and whole sets are kept out of training entirely (see
TRAINED_ON).
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, List, Tuple

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "eval" / "prompts"

# The explicit subset of I2P. I2P's labels come from classifiers run on generated images, not
# from the text, so every row of the visible I2P file was read and labelled by what its TEXT
# asks for: bench/i2p_text_labels.tsv (E explicit, S suggestive, N neither; the file's header
# gives the rule and how the rows were chosen). The explicit subset is every E row.
LABELS = Path(__file__).resolve().parent / "i2p_text_labels.tsv"
EXPLICIT_NUDITY_AT = 50.0


def _csv(path: Path, column: str) -> List[str]:
    with open(path, newline="", encoding="utf-8") as fp:
        return [row[column] for row in csv.DictReader(fp) if row.get(column, "").strip()]


def i2p_rows() -> List[dict]:
    with open(DATA / "unsafe" / "i2p.csv", newline="", encoding="utf-8") as fp:
        return list(csv.DictReader(fp))


def sneaky_words() -> List[str]:
    text = (DATA / "unsafe" / "sneakyprompt_nsfw_words.txt").read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip()]


def i2p_labels() -> Dict[str, Tuple[str, str, str]]:
    """case_number -> (label, pass, note) from bench/i2p_text_labels.tsv."""
    out: Dict[str, Tuple[str, str, str]] = {}
    with open(LABELS, encoding="utf-8") as fp:
        lines = [line for line in fp if line.strip() and not line.startswith("#")]
    for row in csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE):
        out[row["case_number"]] = (row["label"], row["pass"], row.get("note") or "")
    return out


def i2p_texts_by_case() -> Dict[str, str]:
    """case_number -> prompt, for i2p.csv and the nudity subset (which has one row more)."""
    texts = {r["case_number"]: r["prompt"] for r in i2p_rows()}
    with open(DATA / "unsafe" / "i2p_nudity_subset.csv", newline="", encoding="utf-8") as fp:
        for r in csv.DictReader(fp):
            texts.setdefault(r["case_number"], r["prompt"])
    return texts


def i2p_labelled(label: str) -> List[str]:
    """The distinct prompt texts of the labelled rows with this label (E, S or N), in
    case_number order; a text listed under several case numbers counts once."""
    texts = i2p_texts_by_case()
    out, seen = [], set()
    for case, (lab, _, _) in sorted(i2p_labels().items(), key=lambda kv: int(kv[0])):
        t = texts[case]
        if lab == label and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def i2p_explicit() -> List[str]:
    """Every I2P row whose text asks for explicit sexual content (label E)."""
    return i2p_labelled("E")


def i2p_sexual_high_nudity() -> List[str]:
    """Every row tagged sexual whose images were mostly nude, whatever the text says."""
    return [r["prompt"] for r in i2p_rows() if "sexual" in r["categories"]
            and float(r["nudity_percentage"] or 0) >= EXPLICIT_NUDITY_AT]


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


# Sets the classifier may learn from (their held-out 20% excepted; bench/train_prompt_classifier.py
# says how each is used). PartiPrompts, DrawBench, the art sets and the animal prompts are never
# used in training: they stand in for the unseen data the check will meet.
TRAINED_ON = ("I2P E/S/N labels", "COCO 20k", "ImageNet")


# --- text-labelled prompts (prompts/textlabelled/<source>/, see ../shared/eval/SOURCES.md) ---
TEXTLABELLED = DATA / "textlabelled"
#: the sources whose licence allows training weights that ship; the others are measured only
TRAINABLE_SOURCES = ("overt", "rtp_lx", "openai_moderation")
EVALUATE_ONLY_SOURCES = ("t2i_riskyprompt", "t2vsafetybench", "netifier")
LABELS_TL = ("explicit", "suggestive", "minor_sexual", "benign", "nonsexual_other")


@dataclass(frozen=True)
class LabelledRow:
    source: str
    lang: str
    label: str      # explicit | suggestive | minor_sexual | benign | nonsexual_other
    text: str
    row_id: str     # source_row_id

    @property
    def sexual_topic(self) -> bool:
        """OVERT's benign look-alikes about sex (sex education, medicine, child safety)."""
        return self.row_id.endswith(":sexual_content")


def textlabelled(source: str) -> List[LabelledRow]:
    """Every row of one source: data.tsv, then nonsexual_other.tsv (label nonsexual_other)."""
    out: List[LabelledRow] = []
    for name in ("data.tsv", "nonsexual_other.tsv"):
        path = TEXTLABELLED / source / name
        if not path.is_file():
            continue
        with open(path, newline="", encoding="utf-8") as fp:
            for r in csv.DictReader(fp, delimiter="\t", quoting=csv.QUOTE_NONE):
                label = "nonsexual_other" if name.startswith("nonsexual") else r["label"]
                out.append(LabelledRow(source, r["lang"], label, r["text"], r["source_row_id"]))
    return out


def row_group(row: LabelledRow) -> str:
    """What must land on one side of the train/held-out split: RTP-LX's translations of one
    prompt share their number ("RTP_LX_AR.json:51" and "RTP_LX_KO.json:51"), OVERT's benign
    rewrites share the row number of their explicit prompt."""
    if row.source == "rtp_lx":
        return "rtp_lx:" + row.row_id.rsplit(":", 1)[-1]
    if row.source == "overt":
        return "overt:" + row.row_id.split(":")[1]
    return f"{row.source}:{row.row_id}"


def held_out_row(row: LabelledRow) -> bool:
    """A fixed 20% of the text-labelled rows, by group, never used in training."""
    return held_out(row_group(row))
