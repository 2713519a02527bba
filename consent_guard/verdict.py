"""The engine's answer: a small immutable value that adapters turn into a UI action."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional, Tuple

Box = Tuple[int, int, int, int]  # x, y, width, height in the checked image's pixels


class Decision(str, Enum):
    ALLOW = "allow"
    CENSOR = "censor"
    BLOCK = "block"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @classmethod
    def strictest(cls, decisions) -> "Decision":
        return max(decisions, key=lambda d: d.rank, default=cls.ALLOW)


_RANK = {Decision.ALLOW: 0, Decision.CENSOR: 1, Decision.BLOCK: 2}


@dataclass(frozen=True)
class Reason:
    """One finding: which check, what it saw, how sure, and the policy category it falls in."""

    check: str  # e.g. "nudenet", "open_nsfw", "error"
    label: str  # e.g. "FEMALE_GENITALIA_EXPOSED", "whole_image"
    score: float
    category: str  # policy category, e.g. "sexual", "nudity"
    action: Decision  # what the policy says for this category
    region: Optional[Box] = None

    def to_dict(self) -> dict:
        d = {"check": self.check, "label": self.label, "score": round(float(self.score), 4),
             "category": self.category, "action": self.action.value}
        if self.region is not None:
            d["region"] = list(self.region)
        return d


@dataclass(frozen=True)
class FaceFinding:
    """A face seen in the image and whom it matched, if anyone. The identity is the registry's
    id; display names stay in the registry (only the admin sees them)."""

    box: Box
    score: float  # detection confidence
    identity: Optional[str] = None
    scope: Optional[str] = None
    similarity: Optional[float] = None  # to the best-matching identity, when one matched
    # Set when the minors rule estimated this face's age (consent_guard/minors.py):
    age: Optional[float] = None  # expected age in years
    p_minor: Optional[float] = None  # probability of being under 18
    age_unknown: Optional[str] = None  # why the age could not be estimated

    def to_dict(self) -> dict:
        d = {"bbox": list(self.box), "identity": self.identity,
             "similarity": None if self.similarity is None else round(self.similarity, 4)}
        if self.p_minor is not None:
            d["age"] = None if self.age is None else round(float(self.age), 1)
            d["p_minor"] = round(float(self.p_minor), 4)
        if self.age_unknown:
            d["age_unknown"] = self.age_unknown
        return d


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reasons: Tuple[Reason, ...] = ()
    regions: Tuple[Box, ...] = ()  # what to censor when decision is CENSOR
    rule: str = ""  # the policy rule that produced the decision, in words
    error: Optional[str] = None  # set when a check failed; the decision is then BLOCK (fail closed)
    scores: dict = field(default_factory=dict, compare=False)  # raw model scores, for reports
    faces: Tuple[FaceFinding, ...] = ()  # every face checked (registry match, age estimate)

    @property
    def allowed(self) -> bool:
        return self.decision is Decision.ALLOW

    @classmethod
    def failed(cls, message: str) -> "Verdict":
        """Fail closed: a check that could not run blocks the image and says why."""
        return cls(decision=Decision.BLOCK,
                   reasons=(Reason("error", "check_failed", 1.0, "error", Decision.BLOCK),),
                   rule="fail closed: the check could not run, so nothing is saved",
                   error=message)

    def to_dict(self) -> dict:
        d = {"decision": self.decision.value,
             "reasons": [r.to_dict() for r in self.reasons],
             "regions": [list(b) for b in self.regions],
             "rule": self.rule}
        if self.scores:
            d["scores"] = {k: round(float(v), 4) for k, v in self.scores.items()}
        if self.faces:
            d["faces"] = [f.to_dict() for f in self.faces]
        if self.error:
            d["error"] = self.error
        return d

    def summary(self) -> str:
        """One human line, for UI messages and logs (never pixels)."""
        if self.error:
            return f"blocked: {self.error}"
        if self.decision is Decision.ALLOW:
            return "allowed"
        if any(r.category == "minor_explicit" for r in self.reasons):
            return "blocked: explicit content, and a person in the image may be under 18"
        labels = ", ".join(sorted({f"{r.label} ({r.score:.2f})" for r in self.reasons}))
        return f"{self.decision.value}: {labels}"
