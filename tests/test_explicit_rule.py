"""The decision rule, through test doubles at the detector interface."""
import numpy as np
import pytest

from consent_guard import Decision, Engine, Policy
from consent_guard.detectors.base import PartDetection
from consent_guard.models import ModelError
from consent_guard.policy import policy_from_dict

from conftest import FakeParts, FakeScorer, keyed_image

BREAST = PartDetection("FEMALE_BREAST_EXPOSED", 0.6, (10, 10, 20, 16))
GENITALS = PartDetection("MALE_GENITALIA_EXPOSED", 0.7, (30, 20, 10, 10))
WEAK = PartDetection("BUTTOCKS_EXPOSED", 0.22, (5, 5, 10, 10))  # below NudeNet's 0.25
FACE = PartDetection("FACE_FEMALE", 0.9, (0, 0, 20, 20))


def engine(parts=None, whole=None, region=None, policy=None):
    return Engine(policy or Policy(), parts=FakeParts(parts), scorer=FakeScorer(whole, region))


def test_clean_image_is_allowed():
    v = engine(parts={1: [FACE]}, whole={1: 0.05}).check_image(keyed_image(1))
    assert v.decision is Decision.ALLOW and v.reasons == () and v.error is None


def test_whole_image_explicit_blocks_even_without_parts():
    v = engine(whole={1: 0.93}).check_image(keyed_image(1))
    assert v.decision is Decision.BLOCK
    assert [(r.check, r.label, r.category) for r in v.reasons] == [
        ("open_nsfw", "whole_image", "sexual")]


def test_uncertain_band_settled_by_nudenet_part():
    v = engine(parts={1: [BREAST]}, whole={1: 0.5}).check_image(keyed_image(1))
    assert v.decision is Decision.CENSOR
    assert v.regions == (BREAST.box,)
    assert v.reasons[0].label == "FEMALE_BREAST_EXPOSED" and v.reasons[0].score == pytest.approx(0.6)


def test_uncertain_band_without_part_is_allowed():
    v = engine(parts={1: [WEAK, FACE]}, whole={1: 0.7}).check_image(keyed_image(1))
    assert v.decision is Decision.ALLOW
    assert "uncertain band" in v.rule


def test_genitals_block_by_default():
    v = engine(parts={1: [GENITALS, BREAST]}, whole={1: 0.4}).check_image(keyed_image(1))
    assert v.decision is Decision.BLOCK
    assert {r.category for r in v.reasons} == {"sexual", "nudity"}


def test_safe_whole_image_but_part_confirmed_by_region_rescore():
    e = engine(parts={1: [BREAST]}, whole={1: 0.01}, region={1: 0.55})
    v = e.check_image(keyed_image(1))
    assert v.decision is Decision.CENSOR and v.regions == (BREAST.box,)
    assert e._scorer.region_calls == 1


def test_safe_whole_image_and_safe_region_dismisses_part():
    v = engine(parts={1: [BREAST]}, whole={1: 0.01}, region={1: 0.05}).check_image(keyed_image(1))
    assert v.decision is Decision.ALLOW
    assert "dismissed" in v.rule


def test_policy_actions_apply():
    p = policy_from_dict({"actions": {"nudity": "block", "sexual": "censor"}})
    assert engine(parts={1: [BREAST]}, whole={1: 0.5}, policy=p).check_image(
        keyed_image(1)).decision is Decision.BLOCK
    p = policy_from_dict({"actions": {"nudity": "allow"}})
    assert engine(parts={1: [BREAST]}, whole={1: 0.5}, policy=p).check_image(
        keyed_image(1)).decision is Decision.ALLOW


def test_censor_without_region_escalates_to_block():
    p = policy_from_dict({"actions": {"sexual": "censor"}})
    v = engine(whole={1: 0.95}, policy=p).check_image(keyed_image(1))
    assert v.decision is Decision.BLOCK and "no region" in v.rule


def test_censor_with_an_empty_region_escalates_to_block():
    flat = PartDetection("BUTTOCKS_EXPOSED", 0.7, (63, 10, 0, 12))  # clipped at the border
    v = engine(parts={1: [flat]}, whole={1: 0.5}).check_image(keyed_image(1))
    assert v.decision is Decision.BLOCK and v.regions == ()


def test_nudenet_threshold_comes_from_policy():
    p = policy_from_dict({"explicit": {"nudenet_min_score": 0.2}})
    v = engine(parts={1: [WEAK]}, whole={1: 0.5}, policy=p).check_image(keyed_image(1))
    assert v.decision is Decision.CENSOR


def test_batch_gives_one_verdict_per_image_in_order_and_one_model_call():
    e = engine(parts={2: [BREAST], 3: [GENITALS]}, whole={2: 0.5, 3: 0.5, 4: 0.9})
    verdicts = e.check_images([keyed_image(k) for k in (1, 2, 3, 4, 5)])
    assert [v.decision for v in verdicts] == [Decision.ALLOW, Decision.CENSOR, Decision.BLOCK,
                                              Decision.BLOCK, Decision.ALLOW]
    assert e._parts.calls == [5]


def test_detector_exception_fails_closed():
    e = Engine(Policy(), parts=FakeParts(error=RuntimeError("boom")), scorer=FakeScorer())
    v = e.check_image(keyed_image(1))
    assert v.decision is Decision.BLOCK and "boom" in v.error
    assert e.render(keyed_image(1), v) is None


def test_missing_model_fails_closed_with_the_fix(tmp_path):
    p = policy_from_dict({"models": {"paths": {"nudenet_320n": str(tmp_path / "nope.onnx")}}})
    e = Engine(p, scorer=FakeScorer())
    v = e.check_image(keyed_image(1))
    assert v.decision is Decision.BLOCK
    assert "nope.onnx" in v.error and "pip install --no-deps nudenet==3.4.2" in v.error
    with pytest.raises(ModelError):
        e.load()


def test_bad_pixels_fail_closed_for_that_image_only():
    e = engine(whole={1: 0.0})
    bad = np.full((8, 8, 3), np.nan, np.float32)
    verdicts = e.check_images([keyed_image(1), bad, np.zeros((4, 4, 7))])
    assert verdicts[0].decision is Decision.ALLOW
    assert "NaN" in verdicts[1].error and "channels" in verdicts[2].error


def test_image_over_pixel_limit_is_refused():
    p = policy_from_dict({"limits": {"max_pixels": 5000}})
    v = engine(policy=p).check_image(np.zeros((100, 100, 3), np.uint8))
    assert v.decision is Decision.BLOCK and "too large" in v.error


def test_output_for_block_is_a_placeholder_of_the_same_size():
    e = engine(whole={1: 0.95})
    img = keyed_image(1, size=(120, 90))
    v = e.check_image(img)
    out = e.output_for(img, v)
    assert out.shape == img.shape and not np.array_equal(out, img)


def test_verdict_is_immutable_and_serialisable():
    v = engine(parts={1: [BREAST]}, whole={1: 0.5}).check_image(keyed_image(1))
    with pytest.raises(Exception):
        v.decision = Decision.ALLOW  # type: ignore[misc]
    d = v.to_dict()
    assert d["decision"] == "censor" and d["regions"] == [list(BREAST.box)]
    assert d["reasons"][0] == {"check": "nudenet", "label": "FEMALE_BREAST_EXPOSED", "score": 0.6,
                               "category": "nudity", "action": "censor",
                               "region": list(BREAST.box)}
