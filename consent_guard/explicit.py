"""The explicit-content rule: two models, each at its published operating point, and each
settling what the other is unsure of. docs/checks.md ("How the explicit check decides") gives the
evidence. In short, with S the open_nsfw score of the whole image and P the NudeNet
exposed-part detections at or above NudeNet's detection threshold (0.25):

  S >= 0.8               explicit (Yahoo: NSFW with high probability); every part in P is a
                          region, and the whole image is a reason of category "sexual".
  0.2 <= S < 0.8         open_nsfw is unsure; NudeNet settles it: each part in P is a reason.
  S < 0.2                open_nsfw calls the picture safe; a part in P still counts if open_nsfw,
                          re-scoring that part's neighbourhood, does not also call it safe
                          (a small figure in a large scene does not move the whole-image score).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import List, Sequence, Tuple

from .detectors.base import ImageScorer, PartDetection, PartDetector
from .policy import Policy
from .prepare import PreparedImage
from .verdict import Decision, Reason, Verdict

# NudeNet classes that matter, and the policy category each falls in. Covered parts, faces,
# feet, belly, armpits and male chests are not explicit.
PART_CATEGORY = {
    "FEMALE_GENITALIA_EXPOSED": "sexual",
    "MALE_GENITALIA_EXPOSED": "sexual",
    "ANUS_EXPOSED": "sexual",
    "FEMALE_BREAST_EXPOSED": "nudity",
    "BUTTOCKS_EXPOSED": "nudity",
}


def explicit_reasons(image: PreparedImage, parts: List[PartDetection], whole: float,
                     scorer: ImageScorer, policy: Policy) -> Tuple[List[Reason], str]:
    """The reasons (possibly none) the explicit rule finds in one image, and the rule in words."""
    candidates = [p for p in parts
                  if p.label in PART_CATEGORY and p.score >= policy.nudenet_min_score]

    def part_reason(p: PartDetection) -> Reason:
        cat = PART_CATEGORY[p.label]
        return Reason("nudenet", p.label, p.score, cat, policy.action_for(cat), p.box)

    if whole >= policy.open_nsfw_explicit_at:
        reasons = [Reason("open_nsfw", "whole_image", whole, "sexual", policy.action_for("sexual"))]
        reasons += [part_reason(p) for p in candidates]
        return reasons, f"open_nsfw {whole:.2f} >= {policy.open_nsfw_explicit_at}: explicit"

    if whole >= policy.open_nsfw_safe_below:
        if candidates:
            return ([part_reason(p) for p in candidates],
                    f"open_nsfw {whole:.2f} is in its uncertain band; NudeNet found exposed parts")
        return [], (f"open_nsfw {whole:.2f} is in its uncertain band; NudeNet found no exposed part "
                    f">= {policy.nudenet_min_score}")

    if not candidates:
        return [], f"open_nsfw {whole:.2f} < {policy.open_nsfw_safe_below} and no exposed part"
    region_scores = scorer.score_regions(image, [p.box for p in candidates], policy.region_context)
    confirmed = [p for p, s in zip(candidates, region_scores) if s >= policy.open_nsfw_safe_below]
    if confirmed:
        return ([part_reason(p) for p in confirmed],
                f"open_nsfw {whole:.2f} on the whole image, but >= {policy.open_nsfw_safe_below} "
                f"on the neighbourhood of an exposed part NudeNet found")
    return [], (f"open_nsfw {whole:.2f} < {policy.open_nsfw_safe_below}; NudeNet's "
                f"{', '.join(p.label for p in candidates)} dismissed: open_nsfw calls the region "
                f"safe too ({', '.join(f'{s:.2f}' for s in region_scores)})")


def decide(reasons: Sequence[Reason], rule: str, scores: dict) -> Verdict:
    """Turn reasons into a decision: the strictest action wins; censoring needs a region."""
    def censorable(r: Reason) -> bool:
        return r.region is not None and r.region[2] > 0 and r.region[3] > 0

    decision = Decision.strictest(r.action for r in reasons)
    if decision is Decision.CENSOR and any(
            r.action is Decision.CENSOR and not censorable(r) for r in reasons):
        decision = Decision.BLOCK
        rule += "; a censor finding has no region to censor, so the image is blocked"
    regions = tuple(r.region for r in reasons
                    if decision is Decision.CENSOR and r.action is not Decision.ALLOW
                    and censorable(r))
    return Verdict(decision=decision, reasons=tuple(reasons), regions=regions, rule=rule,
                   scores=scores)


def detect_and_score(images: Sequence[PreparedImage], parts: PartDetector,
                     scorer: ImageScorer) -> Tuple[List[List[PartDetection]], List[float]]:
    """Both models at once, each making its own input from the shared working copy: NudeNet
    here, open_nsfw on a second thread (onnxruntime and Pillow's resampling release the GIL).
    Their sessions have half the CPUs each (models.paired_threads). Measured on 2 cores: 0.82x
    the time of running them one after the other (bench/speed.py). An exception from either
    is raised here, after both have finished."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="consent-guard") as pool:
        scored = pool.submit(scorer.score, images)
        detections = parts.detect(images)
        wholes = scored.result()
    return detections, wholes


def check_explicit(images: Sequence[PreparedImage], parts: PartDetector, scorer: ImageScorer,
                   policy: Policy) -> List[Verdict]:
    detections, wholes = detect_and_score(images, parts, scorer)
    if len(detections) != len(images) or len(wholes) != len(images):
        raise RuntimeError(f"detector returned {len(detections)}/{len(wholes)} results "
                           f"for {len(images)} images")
    verdicts = []
    for image, dets, whole in zip(images, detections, wholes):
        reasons, rule = explicit_reasons(image, dets, whole, scorer, policy)
        top = max((d.score for d in dets if d.label in PART_CATEGORY), default=0.0)
        verdicts.append(decide(reasons, rule, {"open_nsfw": whole, "nudenet_exposed_max": top}))
    return verdicts
