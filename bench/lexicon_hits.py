"""Which safe prompts the lexicon alone flags, by term: the check to run after editing a list.

    python bench/lexicon_hits.py [--lang fr] [--category explicit] [--examples 3]
    python bench/lexicon_hits.py --words FILE [--lang fr]    # one candidate term per line

Reads every safe set in ../shared/eval/prompts (PartiPrompts, DrawBench, COCO 20k, art,
famous art, ImageNet, animals) and the I2P rows labelled N (neither) in
bench/i2p_text_labels.tsv, runs the lexicon (no classifier) over each, as check_prompt reads it (safety tags such as
"no nudity" dropped), and prints every term
that fires, with its count per set and a few examples. Only hits of categories that act on
their own (explicit, undress) are listed unless --category says otherwise; --lang keeps the
entries of one lexicon file (every list is matched against every prompt, so a French word can
fire on an English caption).

--textlabelled SOURCE (overt, rtp_lx or openai_moderation: the sets the licence lets us
tune on) counts, per term, the training rows of each label it fires on (held-out rows are
never read), and the explicit rows no term fires on, per language: how a new word list is
checked against both the rows it should catch and the non-sexual rows it must not.

--words FILE checks candidate terms before they are added: for each, the number of safe
prompts it matches, matched exactly as a list entry would be (lexicon.Lexicon.find), and the
examples. This is how a word such as French "bite"
(English "bite") or "con" is caught before it reaches a list.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import prompt_data as pd  # noqa: E402


def _sets():
    sets = dict(pd.safe_sets())
    sets["I2P N rows"] = pd.i2p_labelled("N")
    return sets


def _candidate_lexicon(terms):
    """The candidates as one lexicon (category "explicit"), matched exactly as the real lists
    are: whole words, wildcards, Hangul word starts, the katakana rule, collapsed doubles."""
    from consent_guard.prompts.lexicon import Entry, Lexicon, _class_of
    from consent_guard.prompts.normalise import normalise_term
    entries = []
    for term in dict.fromkeys(terms):
        norm = normalise_term(term)
        if norm.replace("*", "").strip():
            entries.append(Entry("candidate", "explicit", term, norm, _class_of(norm)))
    return Lexicon(entries, {"candidate": "latin"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lang", help="only entries of this lexicon file (en, fr, ko ...)")
    ap.add_argument("--category", action="append",
                    help="categories to list (default: explicit and undress)")
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--words", type=Path, help="candidate terms, one per line, to check")
    ap.add_argument("--textlabelled", choices=("overt", "rtp_lx", "openai_moderation"),
                    help="count hits per label on this source's training rows instead")
    ap.add_argument("--row-lang", help="with --textlabelled: only rows of this language")
    args = ap.parse_args()
    if args.textlabelled:
        return textlabelled_hits(args)
    if not pd.DATA.is_dir():
        print(f"{pd.DATA} is absent: this check needs ../shared/eval", file=sys.stderr)
        return 2
    from consent_guard.prompts.lexicon import Lexicon
    from consent_guard.prompts.normalise import drop_safety_tags, normalise, normalise_term

    sets = _sets()
    normed = {name: [(t, drop_safety_tags(normalise(t))) for t in texts] for name, texts in sets.items()}
    total = sum(len(v) for v in normed.values())

    if args.words:
        terms = [w.strip() for w in args.words.read_text(encoding="utf-8").splitlines()
                 if w.strip() and not w.lstrip().startswith("#")]
        found: dict = defaultdict(list)
        cand = _candidate_lexicon(terms)
        for name, rows in normed.items():
            for text, p in rows:
                for h in cand.find(p):
                    found[h.term].append((name, text))
        print(f"{len(terms)} candidate terms against {total} safe prompts")
        for term in terms:
            rows = found.get(term, [])
            print(f"{'HIT' if rows else 'ok '} {term!r} (normalised {normalise_term(term)!r}): "
                  f"{len(rows)}")
            for name, t in rows[:args.examples]:
                print(f"      [{name}] {t[:110]}")
        return 0

    cats = set(args.category or ("explicit", "undress"))
    lex = Lexicon.load()
    counts: dict = defaultdict(Counter)
    examples: dict = defaultdict(list)
    for name, rows in normed.items():
        for text, p in rows:
            for h in lex.find(p):
                if h.category not in cats or (args.lang and h.lang != args.lang):
                    continue
                key = (h.lang, h.category, h.term)
                counts[key][name] += 1
                if len(examples[key]) < args.examples:
                    examples[key].append(f"[{name}] {text[:110]}  <- {h.matched}")
    print(f"{total} safe prompts; categories {sorted(cats)}"
          + (f"; entries of {args.lang}" if args.lang else ""))
    if not counts:
        print("no hits")
    _print_counts(counts, examples)
    return 0


def _print_counts(counts, examples) -> None:
    """One line per term, most hits first: where it fired, then its examples."""
    for key in sorted(counts, key=lambda k: -sum(counts[k].values())):
        lang, cat, term = key
        per = ", ".join(f"{n} {c}" for n, c in counts[key].most_common())
        print(f"{lang}/{cat}: {term[:60]!r}: {per}")
        for ex in examples[key]:
            print(f"      {ex}")


def textlabelled_hits(args) -> int:
    """Per lexicon term: the training rows of each label it fires on; then, per language,
    the share of explicit training rows the lexicon catches at all."""
    from consent_guard.prompts.lexicon import Lexicon
    from consent_guard.prompts.normalise import drop_safety_tags, normalise
    rows = [r for r in pd.textlabelled(args.textlabelled) if not pd.held_out_row(r)
            and (not args.row_lang or r.lang == args.row_lang)]
    if not rows:
        print(f"no rows for {args.textlabelled} (is ../shared/eval there?)", file=sys.stderr)
        return 2
    lex = Lexicon.load()
    cats = set(args.category or ("explicit", "undress", "minor", "suggestive"))
    counts: dict = defaultdict(Counter)
    examples: dict = defaultdict(list)
    caught: Counter = Counter()
    explicit_rows: Counter = Counter()
    for r in rows:
        label = "benign sexual-topic" if r.label == "benign" and r.sexual_topic else r.label
        hits = lex.find(drop_safety_tags(normalise(r.text)))
        if label == "explicit":
            explicit_rows[r.lang] += 1
            caught[r.lang] += any(h.category in ("explicit", "undress") for h in hits)
        for h in hits:
            if h.category not in cats or (args.lang and h.lang != args.lang):
                continue
            key = (h.lang, h.category, h.term)
            counts[key][label] += 1
            if label != "explicit" and len(examples[key]) < args.examples:
                examples[key].append(f"[{r.lang} {label}] {r.text[:100]}  <- {h.matched}")
    print(f"{len(rows)} training rows of {args.textlabelled}; hits per label")
    _print_counts(counts, examples)
    print("explicit training rows with an explicit or undress term, per language:")
    for lang in sorted(explicit_rows):
        print(f"  {lang:8} {caught[lang]:4} of {explicit_rows[lang]:4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
