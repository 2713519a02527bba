"""The minors rule (consent_guard/minors.py) in the engine, with test doubles at the detector,
face-detector and age-estimator interfaces: no image here is explicit and none shows a child.
The explicit scores and the ages are chosen per image key; the pixels are random noise."""
from __future__ import annotations

from typing import Dict, List, Optional

import pytest

from conftest import FakeFaces, FakeParts, FakeScorer, keyed_image
from consent_guard.detectors.base import PartDetection
from consent_guard.engine import Engine
from consent_guard.faces.age import AgeEstimate, AgeEstimator
from consent_guard.models import ModelError
from consent_guard.policy import (DEFAULT_POLICY_TOML, MINOR_THRESHOLD, Policy, PolicyError,
                                  policy_from_dict)
from consent_guard.registry import Consent, Registry
from consent_guard.verdict import Decision

MINOR, ADULT = 0.6, 0.01  # P(minor) chosen for a face
UNKNOWN = None


class FakeAges:
    """AgeEstimator double: P(minor) per face, chosen per image key; face i is the one FakeFaces
    puts at x = 50 * i. None means the age is unknown (too small / blurred)."""

    model_id = "fake-age"

    def __init__(self, by_key: Dict[int, List[Optional[float]]], error: Exception = None):
        self.by_key, self.error, self.calls = by_key, error, 0

    def estimate(self, rgb, faces):
        self.calls += 1
        if self.error:
            raise self.error
        chosen = self.by_key.get(int(rgb[0, 0, 0]), [])
        out = []
        for f in faces:
            p = chosen[int(f.box[0] // 50)]
            out.append(AgeEstimate(unknown="face too small to estimate its age (20 px, need 48)")
                       if p is None else AgeEstimate(age=12.0 if p >= 0.5 else 30.0, p_minor=p))
        return out


class CountingFaces(FakeFaces):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.detections = 0

    def detect(self, rgb):
        self.detections += 1
        return super().detect(rgb)


def img(key):
    return keyed_image(key, size=(160, 64))


# image keys and what the explicit check sees
EXPLICIT, BAND, SAFE, DISMISSED, NUDITY = 10, 11, 12, 13, 14
WHOLE = {EXPLICIT: 0.95, BAND: 0.5, SAFE: 0.05, DISMISSED: 0.05, NUDITY: 0.5}
PARTS = {DISMISSED: [PartDetection("BUTTOCKS_EXPOSED", 0.6, (2, 2, 20, 20))],
         NUDITY: [PartDetection("BUTTOCKS_EXPOSED", 0.6, (2, 2, 20, 20))]}


def engine(people: Dict[int, List[str]], ages: Dict[int, List[Optional[float]]],
           policy: Policy = None, **kw):
    faces = kw.pop("faces", None) or CountingFaces(people)
    from consent_guard.faces.backends import FaceBackend

    return Engine(policy or Policy(), parts=FakeParts(PARTS),
                  scorer=FakeScorer(whole=WHOLE, region={DISMISSED: 0.05}),
                  face_backend=FaceBackend("fake", faces, faces),
                  age_estimator=kw.pop("age_estimator", None) or FakeAges(ages), **kw)


def one_face(p, key):
    return {key: ["someone"]}, {key: [p]}


def test_fake_estimator_satisfies_the_protocol():
    assert isinstance(FakeAges({}), AgeEstimator)


def test_policy_that_allows_sexual_content_still_blocks_a_minor():
    policy = policy_from_dict({"actions": {"sexual": "allow", "nudity": "allow"}})
    people, ages = one_face(MINOR, EXPLICIT)
    adult_people, adult_ages = one_face(ADULT, EXPLICIT)
    assert engine(adult_people, adult_ages, policy).check_image(img(EXPLICIT)).allowed
    v = engine(people, ages, policy).check_image(img(EXPLICIT))
    assert v.decision is Decision.BLOCK and v.regions == ()
    assert v.reasons[0].check == "age" and v.reasons[0].category == "minor_explicit"
    assert v.reasons[0].label == "minor_explicit" and v.reasons[0].score == MINOR
    assert all(r.action is Decision.BLOCK and r.category == "minor_explicit" for r in v.reasons)
    assert v.rule.startswith("minors:") and "0.60" in v.rule
    assert v.summary() == "blocked: explicit content, and a person in the image may be under 18"
    assert v.faces[0].p_minor == MINOR and v.faces[0].age == 12.0
    d = v.to_dict()
    assert d["faces"][0]["p_minor"] == 0.6 and d["faces"][0]["age"] == 12.0
    assert d["reasons"][0]["category"] == "minor_explicit"


def test_uncertain_band_counts_as_explicit_when_a_face_may_be_a_minor():
    people, ages = one_face(MINOR, BAND)
    v = engine(people, ages).check_image(img(BAND))
    assert v.decision is Decision.BLOCK
    assert [r.check for r in v.reasons] == ["age", "open_nsfw"]
    assert v.reasons[1].score == pytest.approx(0.5)


def test_uncertain_band_with_adults_follows_the_normal_policy():
    people, ages = one_face(ADULT, BAND)
    v = engine(people, ages).check_image(img(BAND))
    assert v.decision is Decision.ALLOW  # the band without an exposed part is allowed
    assert v.faces[0].p_minor == ADULT and "uncertain band" in v.rule
    people, ages = one_face(ADULT, NUDITY)  # band + exposed buttocks: [actions] nudity = censor
    v = engine(people, ages).check_image(img(NUDITY))
    assert v.decision is Decision.CENSOR and v.regions


def test_any_exposed_part_counts_even_when_open_nsfw_dismisses_it():
    people, ages = one_face(MINOR, DISMISSED)
    assert engine({}, {}).check_image(img(DISMISSED)).allowed  # the normal rule dismisses it
    v = engine(people, ages).check_image(img(DISMISSED))
    assert v.decision is Decision.BLOCK
    assert ("nudenet", "exposed_part") in [(r.check, r.label) for r in v.reasons]


def test_safe_images_cost_no_face_detection_or_age_estimate():
    faces = CountingFaces({SAFE: ["someone"]})
    ages = FakeAges({SAFE: [MINOR]})
    v = engine({}, {}, faces=faces, age_estimator=ages).check_image(img(SAFE))
    assert v.allowed and v.faces == ()
    assert faces.detections == 0 and ages.calls == 0


def test_explicit_image_without_a_face_follows_the_normal_policy():
    policy = policy_from_dict({"actions": {"sexual": "allow"}})
    ages = FakeAges({})
    assert engine({}, {}, policy, age_estimator=ages).check_image(img(EXPLICIT)).allowed
    v = engine({}, {}).check_image(img(NUDITY))
    assert v.decision is Decision.CENSOR and v.faces == ()
    assert ages.calls == 0  # no face, nothing to estimate


def test_unknown_age_blocks_by_default_and_follows_policy_when_asked():
    people, ages = one_face(UNKNOWN, NUDITY)
    v = engine(people, ages).check_image(img(NUDITY))
    assert v.decision is Decision.BLOCK and v.reasons[0].category == "minor_explicit"
    assert "cannot be estimated" in v.rule and v.faces[0].age_unknown
    assert v.to_dict()["faces"][0]["age_unknown"].startswith("face too small")
    lenient = policy_from_dict({"minors": {"minor_unknown": "policy"}})
    v = engine(people, ages, lenient).check_image(img(NUDITY))
    assert v.decision is Decision.CENSOR  # [actions] nudity = censor, like any adult


def test_unknown_face_counts_only_in_an_image_explicit_by_the_normal_bar():
    # face 0: a clear adult; face 1: unreadable. Explicit by the normal rule: blocked, even
    # beside an adult (an unreadable face could be anyone's)
    people = {NUDITY: ["adult", "crowd"], BAND: ["adult", "crowd"]}
    v = engine(people, {NUDITY: [ADULT, UNKNOWN]}).check_image(img(NUDITY))
    assert v.decision is Decision.BLOCK and v.reasons[0].category == "minor_explicit"
    # only in the uncertain band (the lower bar is for faces that look under 18): allowed
    v = engine(people, {BAND: [ADULT, UNKNOWN]}).check_image(img(BAND))
    assert v.allowed and v.faces[1].age_unknown
    # ... while a likely minor in the band blocks, whichever face comes first
    v = engine(people, {BAND: [ADULT, MINOR]}).check_image(img(BAND))
    assert v.decision is Decision.BLOCK and v.reasons[0].region[0] == 50


def test_age_model_that_cannot_load_blocks_only_the_images_that_need_it(tmp_path):
    policy = Policy(model_paths={"age_v1": str(tmp_path / "missing.onnx")})
    faces = FakeFaces({BAND: ["someone"], SAFE: ["someone"]})
    from consent_guard.faces.backends import FaceBackend

    e = Engine(policy, parts=FakeParts(PARTS), scorer=FakeScorer(whole=WHOLE),
               face_backend=FaceBackend("fake", faces, faces))
    band, safe = e.check_images([img(BAND), img(SAFE)])
    assert band.decision is Decision.BLOCK and band.error
    assert "missing.onnx" in band.error and "age_v1" in band.error
    assert "fail closed" in band.rule and band.summary().startswith("blocked: ")
    assert safe.allowed


def test_age_estimator_that_raises_fails_closed():
    people, _ = one_face(MINOR, BAND)
    v = engine(people, {}, age_estimator=FakeAges({}, error=RuntimeError("boom"))
               ).check_image(img(BAND))
    assert v.decision is Decision.BLOCK and "boom" in v.error


def test_face_detector_that_cannot_load_fails_closed(monkeypatch):
    from consent_guard.faces import backends

    def broken(*a, **kw):
        raise ModelError("Model file 'face_detection_yunet.onnx' was not found")

    monkeypatch.setattr(backends, "choose_backend", broken)
    e = Engine(Policy(), parts=FakeParts(PARTS), scorer=FakeScorer(whole=WHOLE),
               age_estimator=FakeAges({}))
    band, safe = e.check_images([img(BAND), img(SAFE)])
    assert band.decision is Decision.BLOCK and "yunet" in band.error
    assert safe.allowed


def test_loosened_explicit_bounds_do_not_narrow_the_minors_rule():
    loose = policy_from_dict({"explicit": {"open_nsfw_safe_below": 0.7,
                                           "nudenet_min_score": 0.9}})
    people, ages = one_face(MINOR, BAND)
    assert engine(people, ages, loose).check_image(img(BAND)).decision is Decision.BLOCK
    people, ages = one_face(MINOR, DISMISSED)
    assert engine(people, ages, loose).check_image(img(DISMISSED)).decision is Decision.BLOCK


def test_threshold_is_the_builtin_unless_lowered():
    people, ages = one_face(0.07, BAND)
    assert engine(people, ages).check_image(img(BAND)).allowed  # 0.07 < 0.1
    stricter = policy_from_dict({"minors": {"threshold": 0.05}})
    assert stricter.minor_threshold == 0.05
    assert engine(people, ages, stricter).check_image(img(BAND)).decision is Decision.BLOCK
    people, ages = one_face(MINOR_THRESHOLD, BAND)  # at the threshold counts
    assert engine(people, ages).check_image(img(BAND)).decision is Decision.BLOCK


@pytest.mark.parametrize("minors, why", [
    ({"threshold": 0.5}, "threshold = 0.5 is above the built-in"),
    ({"threshold": 0.11}, "threshold = 0.11 is above the built-in"),
    ({"enabled": False}, "[minors] enabled is not a setting"),
    ({"action": "allow"}, "[minors] action is not a setting"),
    ({"threshhold": 0.05}, "Did you mean 'threshold'"),
])
def test_policy_refuses_to_weaken_the_rule(minors, why):
    with pytest.raises(PolicyError) as err:
        policy_from_dict({"minors": minors})
    assert "the minors rule cannot be weakened: " in str(err.value) and why in str(err.value)


def test_policy_refuses_a_minors_value_that_is_not_a_table_or_number():
    with pytest.raises(PolicyError, match="cannot be weakened"):
        policy_from_dict({"minors": False})
    with pytest.raises(PolicyError, match="threshold must be a number"):
        policy_from_dict({"minors": {"threshold": "low"}})
    with pytest.raises(PolicyError, match="out of range"):
        policy_from_dict({"minors": {"threshold": -0.1}})


def test_a_policy_built_in_code_cannot_raise_the_threshold_either():
    people, ages = one_face(0.3, BAND)
    weak = Policy(minor_threshold=0.9)
    assert engine(people, ages, weak).check_image(img(BAND)).decision is Decision.BLOCK


def test_default_policy_file_documents_the_threshold():
    assert f"threshold = {MINOR_THRESHOLD}" in DEFAULT_POLICY_TOML
    assert Policy().minor_threshold == MINOR_THRESHOLD


def test_minor_rule_and_protected_identity_on_one_detection(tmp_path):
    reg = Registry.create(tmp_path / "identities.db", "correct horse battery")
    try:
        reg.add("Bob", "explicit", Consent("Bob"),
                {"fake-000000000001": FakeFaces.vector("bob")[None]})
        faces = CountingFaces({BAND: ["bob", "stranger"]})
        e = engine({}, {}, faces=faces, registry=reg,
                   age_estimator=FakeAges({BAND: [ADULT, MINOR]}))
        v = e.check_image(img(BAND))
        # one detection serves both checks (Bob matched upright: no turned copies needed)
        assert faces.detections == 1
        assert v.decision is Decision.BLOCK
        cats = [r.category for r in v.reasons]
        assert "minor_explicit" in cats and "protected_identity" in cats
        assert [f.identity is not None for f in v.faces] == [True, False]
        assert [f.p_minor for f in v.faces] == [ADULT, MINOR]
    finally:
        reg.close()


def test_boxes_are_reported_in_full_size_pixels():
    people, ages = one_face(MINOR, BAND)
    v = engine(people, ages).check_images([img(BAND)], full_size=(320, 128))[0]
    assert v.faces[0].box == (0, 0, 96, 96) and v.reasons[0].region == (0, 0, 96, 96)

