"""check_prompt: the lexicon, the classifier and the registry's names -> one Verdict.

Categories and what decides them:
  sexual_explicit    an explicit term, or the classifier at or above the threshold of the
                     prompt's script, or a suggestive term that the classifier confirms (its
                     score at or above the model's lower ``corroborate`` threshold: "a woman in
                     a see-through dress, lascivious" has a suggestive word and a sexual meaning;
                     "a busty opera singer" has the word only): policy action ([prompts]
                     sexual_explicit, default block). A block by the classifier alone says so
                     (its reason is labelled CLASSIFIER_ONLY and the rule names the score and
                     threshold): no explicit or confirmable word was found, a model judged the
                     meaning, and it can be wrong. A confirmed suggestive word says so too
                     (CORROBORATED).
  sexual_suggestive  a suggestive term only: policy action (default allow; it is logged)
  undress_request    "remove her clothes", "make him naked", ...: always block (with an input
                     photo, this is how real people are undressed)
  minor_sexual       a term for children or school age together with any sexual term or a
                     classifier score at or above its threshold: always block; no policy
                     can allow it. A prompt about children alone is fine.
  protected_identity a protected person's display name or alias together with any sexual
                     term or classifier hit: always block
The negative prompt never triggers anything: "nude, nsfw" there is a safety tool.

Education, health and child-protection prompts ("a poster about preventing child sexual
abuse", "a sex education class for teenagers") name a sexual subject without asking for a
sexual picture: with a context word, the phrases that only name the subject are set aside and
the lexicon reads the rest (context.py says which, and why the exception is narrow). Any
other sexual word, and any classifier hit, still counts.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ..verdict import Decision, Reason, Verdict
from .classifier import PromptClassifier
from .context import has_context, mask_topics
from .lexicon import Hit, Lexicon
from .normalise import drop_safety_tags, normalise

ALWAYS_BLOCK = ("undress_request", "minor_sexual", "protected_identity")
# The classifier reads phrases: on one- and two-word prompts ("bond", "molecule") sentence
# embeddings are unreliable, and words are the lexicon's job. From three words on it runs: on
# the visible sets, 3 and 4 flag the same prompts (bench/prompts.py).
CLASSIFIER_MIN_WORDS = 3
#: the label of the classifier's reason when no listed word backs it
CLASSIFIER_ONLY = "semantic (classifier only)"
#: the label of the classifier's reason when it confirms a suggestive word
CORROBORATED = "semantic (confirms a suggestive word)"
#: suggestive terms the classifier may not confirm: "fuck" alone is mostly an insult or an
#: intensifier in web text ("fuck you", "fucking disgrace"), and its sexual uses are explicit
#: patterns of their own (lexicon/en.toml); on the training rows it was confirmed on 12
#: non-sexual rows for every 2 explicit ones (issue 16)
NOT_CONFIRMED = frozenset({"fuck*"})
#: a pattern that starts with this regex comment is never confirmed either (lexicon/en.toml:
#: kissing as lovers do, suggestive only so that beside a child it is minor_sexual)
NOT_CONFIRMED_MARK = "(?#not confirmed)"


def check_prompt(text: str, negative: Optional[str] = None, *, lexicon: Lexicon,
                 classifier: Optional[PromptClassifier], explicit_action: Decision,
                 suggestive_action: Decision,
                 protected_names: Sequence[Tuple[str, str]] = ()) -> Verdict:
    """`protected_names`: (identity id, display name or alias) pairs from the registry."""
    prompt = drop_safety_tags(normalise(text or ""))
    hits = lexicon.find(prompt)
    by_cat = {c: [h for h in hits if h.category == c] for c in
              ("explicit", "suggestive", "minor", "undress")}
    topic_only = _topic_only(prompt, lexicon, by_cat)
    if topic_only:
        by_cat["explicit"], by_cat["suggestive"] = [], []
    use_classifier = classifier is not None and \
        sum(w != "," for w in prompt.text.split()) >= CLASSIFIER_MIN_WORDS
    score = float(classifier.score([prompt.text])[0]) if use_classifier else 0.0
    threshold = _threshold(classifier, prompt.text) if use_classifier else 1.0
    semantic = use_classifier and score >= threshold
    confirmed = _confirmed(classifier, score, by_cat["suggestive"], threshold) \
        if use_classifier else []
    sexual = bool(by_cat["explicit"] or by_cat["suggestive"] or semantic)

    reasons: List[Reason] = []

    def add(category: str, action: Decision, found: Sequence[Hit]):
        for h in found:
            reasons.append(Reason("prompt_lexicon", h.matched or h.term, 1.0, category, action))

    if by_cat["undress"]:
        add("undress_request", Decision.BLOCK, by_cat["undress"])
    if by_cat["minor"] and sexual:
        add("minor_sexual", Decision.BLOCK, by_cat["minor"])
    if sexual and protected_names:
        names = lexicon.find_names(prompt, [name for _, name in protected_names])
        for ident in sorted({i for i, name in protected_names if name in names}):
            reasons.append(Reason("prompt_identity", ident, 1.0, "protected_identity",
                                  Decision.BLOCK))
    add("sexual_explicit", explicit_action, by_cat["explicit"])
    if semantic or confirmed:
        label = "semantic" if (by_cat["explicit"] or by_cat["undress"]) \
            else CORROBORATED if confirmed else CLASSIFIER_ONLY
        reasons.append(Reason("prompt_classifier", label, score, "sexual_explicit",
                              explicit_action))
    add("sexual_suggestive", suggestive_action, by_cat["suggestive"])

    decision = Decision.strictest(r.action for r in reasons)
    if decision is Decision.CENSOR:  # a prompt cannot be censored: it is sent or not
        decision = Decision.BLOCK
    categories = sorted({r.category for r in reasons})
    if not reasons:
        rule = "no sexual term, classifier score below its threshold"
        if topic_only:
            rule = ("sexual words only as the topic of an education, health or protection "
                    "prompt (" + ", ".join(sorted({h.matched for h in topic_only})) +
                    "), classifier score below its threshold")
    else:
        rule = "prompt: " + ", ".join(
            f"{c} -> {'block (always)' if c in ALWAYS_BLOCK else _action(reasons, c)}"
            for c in categories)
        if any(r.label == CLASSIFIER_ONLY for r in reasons):
            rule += (f" (by the classifier alone: no explicit or confirmable word, score "
                     f"{score:.2f} >= threshold {threshold:.2f})")
        elif any(r.label == CORROBORATED for r in reasons):
            rule += (" (a suggestive word, " + ", ".join(sorted({h.matched or h.term
                                                                 for h in confirmed}))
                     + f", confirmed by the classifier: score {score:.2f} >= "
                     f"{min(threshold, _corroborate(classifier)):.2f})")
    scores = {"prompt_classifier": score}
    return Verdict(decision, tuple(reasons), (), rule, None, scores)


def _topic_only(prompt, lexicon: Lexicon, by_cat) -> List[Hit]:
    """The explicit and suggestive hits, when every one of them is part of a phrase that only
    names the subject of an education / health / protection prompt (context.py); else []."""
    sexual = by_cat["explicit"] + by_cat["suggestive"]
    if not sexual or not has_context(prompt.text):
        return []
    left = [h for h in lexicon.find(mask_topics(prompt))
            if h.category in ("explicit", "suggestive")]
    return [] if left else sexual


def _corroborate(classifier) -> float:
    """The model's confirming threshold (2.0, never reached, when it has none: an older
    file, a test double)."""
    value = getattr(classifier, "corroborate", None)
    return 2.0 if value is None else float(value)


def _confirmed(classifier, score: float, suggestive: Sequence[Hit],
               threshold: float) -> List[Hit]:
    """The suggestive hits the classifier's score confirms as explicit: at or above the
    confirming threshold, or the prompt's own threshold when that is lower (a score that
    blocks a prompt with no word at all confirms a suggestive one too)."""
    if score < min(threshold, _corroborate(classifier)):
        return []
    return [h for h in suggestive if h.term not in NOT_CONFIRMED
            and not h.term.startswith(NOT_CONFIRMED_MARK)]


def _threshold(classifier: PromptClassifier, text: str) -> float:
    """The threshold for this prompt's script (a classifier without per-script thresholds, a
    test double for instance, has one)."""
    per_script = getattr(classifier, "threshold_for", None)
    return float(per_script(text)) if per_script is not None else float(classifier.threshold)


def _action(reasons: Sequence[Reason], category: str) -> str:
    return next(r.action.value for r in reasons if r.category == category)


def prompt_record(text: str, verdict: Verdict) -> dict:
    """The CLI's JSON line: {"text", "decision", "categories", "score", "matched"}."""
    return {"text": text, "decision": verdict.decision.value,
            "categories": sorted({r.category for r in verdict.reasons}),
            "score": round(float(verdict.scores.get("prompt_classifier", 0.0)), 4),
            "matched": sorted({r.label for r in verdict.reasons
                               if r.check == "prompt_lexicon"})}
