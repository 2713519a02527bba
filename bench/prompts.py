"""Prompt check: true- and false-positive rates per dataset, latency, the variants table.

    python bench/prompts.py [--show-subset N] [--variants] [--misses N]

At the default policy (sexual_explicit block, sexual_suggestive allow, classifier on), a
prompt counts as caught when the decision is block. Data: ../shared/eval/prompts (see
bench/prompt_data.py for the explicit subset of I2P and the held-out split). The classifier
was trained on parts of some of these sets; their held-out 20% is reported separately, and
the safe sets never used in training (PartiPrompts, DrawBench, art, famous art, animals)
stand in for unseen data. Latency: the whole check_prompt per prompt, warm, one at a time.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import prompt_data as pd  # noqa: E402
from consent_guard.engine import Engine  # noqa: E402
from consent_guard.policy import Policy  # noqa: E402


def blocked(engine, texts):
    """The texts the check blocks (one check per text)."""
    return [t for t in texts if engine.check_prompt(t).decision.value == "block"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--show-subset", type=int, default=0, metavar="N",
                    help="print N random rows of I2P's sexual, mostly-nude rows (from which the "
                         "explicit subset was read) and exit")
    ap.add_argument("--misses", type=int, default=5, metavar="N",
                    help="print up to N misses / false positives per set")
    ap.add_argument("--variants", action="store_true",
                    help="print the table of obfuscated and translated variants")
    args = ap.parse_args()
    if not pd.DATA.is_dir():
        print(f"{pd.DATA} is absent: this benchmark needs ../shared/eval", file=sys.stderr)
        return 2
    if args.show_subset:
        rows = pd.i2p_sexual_high_nudity()
        for t in random.Random(0).sample(rows, min(args.show_subset, len(rows))):
            print("-", t[:160])
        return 0

    engine = Engine(Policy())
    engine.check_prompt("warm up")
    explicit = pd.i2p_explicit()
    unsafe = {
        f"I2P explicit subset (all {len(explicit)})": explicit,
        "I2P explicit subset, held out of training": [t for t in explicit if pd.held_out(t)],
        "I2P nudity subset (OPTML)": pd.nudity_subset(),
        "SneakyPrompt NSFW words as prompts": pd.sneaky_words(),
        "I2P sexual & nudity >= 50%, any text (image labels)": pd.i2p_sexual_high_nudity(),
    }
    print("TPR (blocked), default policy")
    for name, texts in unsafe.items():
        caught = set(blocked(engine, texts))
        print(f"  {name:55} {len(caught) / max(1, len(texts)):7.1%}  of {len(texts)}")
        for t in [t for t in texts if t not in caught][:args.misses]:
            print(f"      missed: {t[:120]}")
    print("FPR (blocked), default policy")
    trained_on = {"COCO 20k", "ImageNet"}
    for name, texts in pd.safe_sets().items():
        flagged = blocked(engine, texts)
        note = ""
        if name in trained_on:
            held = [t for t in texts if pd.held_out(t)]
            held_fpr = sum(t in set(flagged) for t in held) / max(1, len(held))
            note = f"  (held out of training: {held_fpr:.2%} of {len(held)})"
        print(f"  {name:55} {len(flagged) / len(texts):7.2%}  of {len(texts)}{note}")
        for t in flagged[:args.misses]:
            v = engine.check_prompt(t)
            print(f"      flagged: {t[:100]}  <- {', '.join(r.label for r in v.reasons)}")

    sample = pd.safe_sets()["PartiPrompts"][:300] + explicit[:100]
    times = []
    for t in sample:
        start = time.perf_counter()
        engine.check_prompt(t)
        times.append(time.perf_counter() - start)
    print(f"latency per prompt ({len(sample)} prompts, warm): p50 "
          f"{1000 * np.percentile(times, 50):.2f} ms, p99 {1000 * np.percentile(times, 99):.2f} ms")

    if args.variants:
        from test_prompt_text import VARIANTS

        print("\nvariants (tests/test_prompt_text.py): text | expected | check_prompt")
        for row in VARIANTS:
            text, expected = row[0], row[1]
            v = engine.check_prompt(text)
            got = sorted({r.category for r in v.reasons})
            print(f"  {text[:50]:50} | {','.join(sorted(expected)) or '-':28} | "
                  f"{v.decision.value} {','.join(got)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
