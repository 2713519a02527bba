"""The minors rule: an explicit image of anyone who looks under 18 is blocked, whatever the
policy's [actions] say. No policy key turns it off or loosens it (policy.py refuses them).

When it runs. Only on an image the explicit check did not call plainly safe: the rule looks at
an image when open_nsfw scores it at or above its "safe" bound (the uncertain band, 0.2, or
above), or NudeNet sees any exposed part at or above its detection threshold (0.25), or the
explicit rule found a reason. The bounds are the stricter of the policy's [explicit] values and
the built-in defaults, so tuning [explicit] cannot narrow this rule. A safe image (the common
case) costs nothing more; an image in the band costs a face detection and one small network per
face (bench/ages.py).

What it decides. For such an image, every face found (by the same detector the face stage
uses) gets an age estimate (consent_guard/faces/age.py) with P(minor), the probability mass the
model puts under 18. Then:
  - a face with P(minor) >= the threshold (policy [minors] threshold, built-in MINOR_THRESHOLD):
    the bar for "explicit" drops to the band above, and the image is blocked with a reason of
    category "minor_explicit", even where [actions] would allow or censor it;
  - a face whose age cannot be estimated (too small or too blurred), in an image that is
    explicit by the normal rule's own bar (the explicit check found a reason, whatever
    [actions] then does with it): blocked the same way, when [minors] minor_unknown = "block"
    (the default); with "policy" it counts as an adult. The lower bar is for faces that look
    under 18; "unknown plus explicit" uses the normal one, or every benign photo in the
    uncertain band with a blurred face in the background would be blocked (img54.jpg of the
    evaluation set: a sharp adult, four blurred faces behind her, open_nsfw 0.41);
  - every face an adult: the normal rule's verdict stands;
  - no face at all: the normal rule's verdict stands. The rule needs a face to act on; an
    explicit image without one is treated like any other explicit image.
"""
from __future__ import annotations

import dataclasses
from typing import List, Sequence

from .policy import MINOR_THRESHOLD, Policy
from .verdict import Decision, FaceFinding, Reason, Verdict

CATEGORY = "minor_explicit"

# The built-in operating points of the explicit check (policy.py defaults): the minors rule
# never uses a looser bound than these, whatever [explicit] says.
DEFAULT_SAFE_BELOW = Policy().open_nsfw_safe_below
DEFAULT_PART_SCORE = Policy().nudenet_min_score


def safe_below(policy: Policy) -> float:
    return min(policy.open_nsfw_safe_below, DEFAULT_SAFE_BELOW)


def part_score(policy: Policy) -> float:
    return min(policy.nudenet_min_score, DEFAULT_PART_SCORE)


def threshold(policy: Policy) -> float:
    """The P(minor) threshold in force: the policy's, never above the built-in one (the policy
    loader refuses a higher value; this also holds for a Policy built in code)."""
    return min(policy.minor_threshold, MINOR_THRESHOLD)


def evidence(verdict: Verdict, policy: Policy) -> List[Reason]:
    """What the minors rule counts as explicit in this image (empty: plainly safe). Reasons of
    category "minor_explicit", action block."""
    if verdict.error:
        return []
    whole = float(verdict.scores.get("open_nsfw", 0.0))
    part = float(verdict.scores.get("nudenet_exposed_max", 0.0))
    found = [Reason(r.check, r.label, r.score, CATEGORY, Decision.BLOCK, r.region)
             for r in verdict.reasons if r.check in ("open_nsfw", "nudenet")]
    checks = {r.check for r in found}
    if whole >= safe_below(policy) and "open_nsfw" not in checks:
        found.append(Reason("open_nsfw", "whole_image", whole, CATEGORY, Decision.BLOCK))
    if part >= part_score(policy) and "nudenet" not in checks:
        found.append(Reason("nudenet", "exposed_part", part, CATEGORY, Decision.BLOCK))
    return found


def needs_age_check(verdict: Verdict, policy: Policy) -> bool:
    """Whether this image's faces must be age-checked (it is not plainly safe)."""
    return bool(evidence(verdict, policy))


def explicit_by_normal_bar(verdict: Verdict) -> bool:
    """Whether the explicit check itself found something (at the policy's thresholds; what
    [actions] does with it does not matter here)."""
    return any(r.check in ("open_nsfw", "nudenet") for r in verdict.reasons)


def flagged(faces: Sequence[FaceFinding], policy: Policy, explicit: bool) -> List[FaceFinding]:
    """The faces the rule acts on: likely minors; and, when the image is `explicit` by the
    normal bar and minor_unknown = "block", faces whose age cannot be estimated."""
    limit = threshold(policy)
    out = []
    for f in faces:
        if f.p_minor is not None:
            if f.p_minor >= limit:
                out.append(f)
        elif f.age_unknown and explicit and policy.minor_unknown != "policy":
            out.append(f)
    return out


def apply_minor_rule(verdict: Verdict, faces: Sequence[FaceFinding], policy: Policy) -> Verdict:
    """The verdict after the minors rule, given the faces found with their age estimates."""
    found = evidence(verdict, policy)
    hits = flagged(faces, policy, explicit_by_normal_bar(verdict))
    if not found or not hits:
        return dataclasses.replace(verdict, faces=tuple(faces)) if faces else verdict
    reasons = [Reason("age", CATEGORY, 1.0 if f.p_minor is None else float(f.p_minor), CATEGORY,
                      Decision.BLOCK, f.box) for f in hits]
    return Verdict(decision=Decision.BLOCK, reasons=tuple(reasons + found), regions=(),
                   rule=_rule(hits, found, policy), scores=dict(verdict.scores),
                   faces=tuple(faces))


def _rule(hits: Sequence[FaceFinding], found: Sequence[Reason], policy: Policy) -> str:
    known = [f.p_minor for f in hits if f.p_minor is not None]
    who = []
    if known:
        who.append(f"a face estimated under 18 (P(minor) {max(known):.2f} >= "
                   f"{threshold(policy)})")
    if len(known) < len(hits):
        who.append("a face whose age cannot be estimated ([minors] minor_unknown = \"block\")")
    what = ", ".join(_what(r) for r in found)
    return ("minors: an explicit image of anyone who may be under 18 is always blocked; "
            + " and ".join(who) + f"; explicit by the minors rule's lower bar: {what}")


def _what(r: Reason) -> str:
    if r.check == "open_nsfw":
        return f"open_nsfw {r.score:.2f}"
    return f"NudeNet {r.label} {r.score:.2f}"


def minor_block(verdict: Verdict) -> bool:
    """Whether this verdict is a block by the minors rule."""
    return any(r.category == CATEGORY for r in verdict.reasons)


def age_fields(estimate) -> dict:
    """FaceFinding fields for an AgeEstimate (see faces/age.py)."""
    if estimate is None:
        return {}
    if estimate.known:
        return {"age": float(estimate.age), "p_minor": float(estimate.p_minor)}
    return {"age_unknown": estimate.unknown or "age not estimated"}


def with_age(finding: FaceFinding, estimate) -> FaceFinding:
    fields = age_fields(estimate)
    return dataclasses.replace(finding, **fields) if fields else finding


__all__ = ["CATEGORY", "apply_minor_rule", "evidence", "needs_age_check", "flagged",
           "minor_block", "threshold", "with_age"]
