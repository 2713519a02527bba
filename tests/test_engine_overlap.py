"""The protected-identity check runs beside the explicit models (Engine._faces_ahead): faces are
found, matched and searched for while NudeNet and open_nsfw run, and what each decides is what
it decided one after the other. Faces and models here are test doubles (conftest)."""
from __future__ import annotations

import threading
import time

from conftest import FakeFaces, FakeParts, FakeScorer
from consent_guard.detectors.base import PartDetection
from consent_guard.engine import Engine
from consent_guard.faces.age import AgeEstimate
from consent_guard.faces.backends import FaceBackend
from consent_guard.policy import Policy
from consent_guard.registry import Registry
from consent_guard.verdict import Decision
from test_identity_rules import PASS, img, registry  # noqa: F401  (Alice: any, Bob: explicit)

ALICE, STRANGER, NOBODY, BAND = 30, 31, 32, 33  # image keys
PEOPLE = {ALICE: ["alice"], STRANGER: ["stranger"], BAND: ["stranger"]}
WAIT = 10.0  # s: how long a double waits for the other side before it gives up


class SignallingFaces(FakeFaces):
    """Face double that says when it first detects, and can fail on one image key."""

    def __init__(self, people, fail_on=None):
        super().__init__(people)
        self.started, self.fail_on, self.detections = threading.Event(), fail_on, 0
        self.threads = set()

    def detect(self, rgb):
        self.detections += 1
        self.threads.add(threading.current_thread().name)
        self.started.set()
        if self.fail_on is not None and int(rgb[0, 0, 0]) == self.fail_on:
            raise RuntimeError("detector exploded on this image")
        return super().detect(rgb)


class WaitingParts(FakeParts):
    """NudeNet double that waits (up to WAIT s) for the face detector to start before it
    answers: it returns only when the two ran at the same time (or the wait ran out)."""

    def __init__(self, faces: SignallingFaces, by_key=None, error=None):
        super().__init__(by_key, error)
        self.faces, self.overlapped = faces, None

    def detect(self, images):
        self.overlapped = self.faces.started.wait(WAIT)
        return super().detect(images)


def engine(registry, faces, parts=None, policy=None, whole=None):
    return Engine(policy or Policy(), parts=parts or WaitingParts(faces),
                  scorer=FakeScorer(whole=whole or {}), registry=registry,
                  face_backend=FaceBackend("fake", faces, faces))


def test_faces_are_found_while_the_explicit_models_run(registry):
    faces = SignallingFaces(PEOPLE)
    parts = WaitingParts(faces)
    verdicts = engine(registry, faces, parts).check_images([img(ALICE), img(STRANGER)])
    assert parts.overlapped is True  # one after the other, NudeNet's double would wait in vain
    assert threading.current_thread().name not in faces.threads
    alice, stranger = verdicts
    assert alice.decision is Decision.BLOCK and alice.faces[0].identity
    assert stranger.decision is Decision.ALLOW and stranger.faces[0].identity is None


def test_nobody_enrolled_finds_no_faces_ahead(tmp_path):
    empty = Registry.create(tmp_path / "identities.db", PASS)
    try:
        faces = SignallingFaces(PEOPLE)
        parts = FakeParts()
        v = engine(empty, faces, parts).check_image(img(ALICE))
        assert v.decision is Decision.ALLOW and faces.detections == 0
    finally:
        empty.close()


def test_a_face_check_that_raises_blocks_only_its_own_image(registry):
    faces = SignallingFaces(PEOPLE, fail_on=STRANGER)
    alice, stranger, nobody = engine(registry, faces).check_images(
        [img(ALICE), img(STRANGER), img(NOBODY)])
    assert alice.decision is Decision.BLOCK and alice.error is None
    assert stranger.decision is Decision.BLOCK and "detector exploded" in stranger.error
    assert nobody.decision is Decision.ALLOW and nobody.error is None


def test_explicit_models_that_raise_fail_closed_and_leave_no_face_work_running(registry):
    faces = SignallingFaces(PEOPLE)
    parts = WaitingParts(faces, error=RuntimeError("NudeNet exploded"))
    verdicts = engine(registry, faces, parts).check_images([img(ALICE), img(STRANGER)])
    assert all(v.decision is Decision.BLOCK and "NudeNet exploded" in v.error
               for v in verdicts)
    done = faces.detections  # the face work finished before check_images returned
    assert done >= 2
    time.sleep(0.2)
    assert faces.detections == done


def test_scope_explicit_still_waits_for_the_explicit_verdict(registry):
    people = {40: ["bob"], 41: ["bob"]}
    faces = SignallingFaces(people)
    parts = WaitingParts(faces, {41: [PartDetection("BUTTOCKS_EXPOSED", 0.7, (1, 1, 8, 8))]})
    plain, censored = engine(registry, faces, parts, whole={41: 0.5}).check_images(
        [img(40), img(41)])
    assert plain.decision is Decision.ALLOW and plain.faces[0].identity
    assert censored.decision is Decision.BLOCK and "scope explicit" in censored.rule


def test_a_smaller_detection_size_is_redone_at_the_minors_rules_size(registry):
    """With [faces] detect_size under 640, the minors rule looks for faces on a larger copy
    than matching does; an image it applies to is then detected once, on that copy, after
    the explicit verdict (as before), and a plainly safe one on the policy's own copy."""
    class Adults:
        model_id = "fake-age"

        def estimate(self, rgb, faces):
            return [AgeEstimate(age=30.0, p_minor=0.01) for _ in faces]

    faces = SignallingFaces(PEOPLE)
    e = Engine(Policy(detect_size=480), parts=FakeParts(), scorer=FakeScorer(whole={BAND: 0.5}),
               registry=registry, face_backend=FaceBackend("fake", faces, faces),
               age_estimator=Adults())
    band = e.check_image(img(BAND))
    assert band.decision is Decision.ALLOW and band.faces[0].p_minor == 0.01
    assert threading.current_thread().name in faces.threads  # not ahead: after the verdict
