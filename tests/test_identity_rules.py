"""Protected identities in the engine: matching, the two scopes, inputs, reloads, fail closed.
Faces here are test doubles (FakeFaces) at the detector/embedder interface."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import FakeFaces, FakeParts, FakeScorer, fake_backend, keyed_image
from consent_guard.detectors.base import PartDetection
from consent_guard.engine import Engine
from consent_guard.faces import backends as backends_mod
from consent_guard.faces.matching import Gallery
from consent_guard.models import ModelError
from consent_guard.policy import Policy
from consent_guard.registry import Consent, Registry
from consent_guard.verdict import Decision

PASS = "correct horse battery"
# image keys: 30 alice alone, 31 bob alone, 32 alice and a stranger, 33 nobody,
# 40 alice in an image the explicit check censors, 41 bob in one it censors
PEOPLE = {30: ["alice"], 31: ["bob"], 32: ["stranger", "alice"], 33: [], 40: ["alice"],
          41: ["bob"]}


def img(key):
    return keyed_image(key, size=(120, 64))


@pytest.fixture
def registry(tmp_path):
    reg = Registry.create(tmp_path / "identities.db", PASS)
    reg.add("Alice", "any", Consent("Alice"), {"fake-000000000001": FakeFaces.vector("alice")[None]})
    reg.add("Bob", "explicit", Consent("Bob's parent", on_behalf_of="Bob"),
            {"fake-000000000001": FakeFaces.vector("bob")[None]})
    yield reg
    reg.close()


def engine(registry, **kw):
    parts = FakeParts({40: [PartDetection("BUTTOCKS_EXPOSED", 0.7, (1, 1, 8, 8))],
                       41: [PartDetection("BUTTOCKS_EXPOSED", 0.7, (1, 1, 8, 8))]})
    return Engine(Policy(), parts=parts, scorer=FakeScorer(whole={40: 0.5, 41: 0.5}),
                  registry=registry, face_backend=kw.pop("backend", fake_backend(PEOPLE)), **kw)


def ids(registry):
    return {i.name: i.id for i in registry.identities()}


def test_scope_any_blocks_every_output_showing_them(registry):
    v = engine(registry).check_image(img(30))
    assert v.decision is Decision.BLOCK
    assert v.reasons[-1].check == "face_match" and v.reasons[-1].label == ids(registry)["Alice"]
    assert "scope any" in v.rule
    d = v.to_dict()
    assert d["faces"][0]["identity"] == ids(registry)["Alice"] and d["faces"][0]["similarity"] > 0.99
    assert "Alice" not in str(d)  # the verdict names the id, never the display name


def test_scope_explicit_blocks_only_explicit_images(registry):
    e = engine(registry)
    bob = e.check_image(img(31))
    assert bob.decision is Decision.ALLOW and bob.faces[0].identity == ids(registry)["Bob"]
    censored_bob = e.check_image(img(41))
    assert censored_bob.decision is Decision.BLOCK  # censor is not enough: block
    assert "scope explicit" in censored_bob.rule
    assert censored_bob.regions == ()


def test_strangers_and_empty_images_pass_and_are_reported(registry):
    e = engine(registry)
    v = e.check_image(img(32))  # a stranger and alice: alice decides
    assert v.decision is Decision.BLOCK
    assert [f.identity for f in v.faces] == [None, ids(registry)["Alice"]]
    assert e.check_image(img(33)).decision is Decision.ALLOW
    assert e.check_image(img(33)).faces == ()


def test_input_images_refuse_scope_any_only(registry):
    e = engine(registry)
    assert e.check_input_image(img(30)).decision is Decision.BLOCK
    assert "may not be used as a source" in e.check_input_image(img(30)).rule
    assert e.check_input_image(img(31)).decision is Decision.ALLOW  # scope explicit
    assert e.check_input_image(img(41)).decision is Decision.ALLOW  # inputs: no explicit check
    bad = e.check_input_image(np.zeros((0, 5, 3), np.uint8))
    assert bad.error and bad.decision is Decision.BLOCK


def test_no_registry_or_nobody_enrolled_means_no_face_stage(tmp_path):
    backend = fake_backend(PEOPLE)
    e = Engine(Policy(), parts=FakeParts(), scorer=FakeScorer(), face_backend=backend)
    assert e.check_image(img(30)).decision is Decision.ALLOW and backend.embedder.embedded == 0
    empty = Registry.create(tmp_path / "empty.db", PASS)
    e = engine(empty, backend=backend)
    assert e.check_image(img(30)).decision is Decision.ALLOW and backend.embedder.embedded == 0


def test_registry_changes_are_picked_up_without_restart(registry, tmp_path):
    e = engine(registry)
    assert e.check_image(img(30)).decision is Decision.BLOCK
    other = Registry.open(tmp_path / "identities.db", passphrase=PASS)  # another process: CLI
    other.revoke(ids(other)["Alice"])
    other.close()
    assert e.check_image(img(30)).decision is Decision.ALLOW


def test_face_stage_failure_fails_closed(registry):
    broken = fake_backend(PEOPLE, error=RuntimeError("detector exploded"))
    v = engine(registry, backend=broken).check_image(img(33))
    assert v.decision is Decision.BLOCK and "detector exploded" in v.error
    v = engine(registry, backend=broken).check_input_image(img(33))
    assert v.decision is Decision.BLOCK and "detector exploded" in v.error


def test_backend_that_cannot_load_fails_closed(registry, monkeypatch):
    def no_models(*a, **k):
        raise ModelError("face_recognition_sface_2021dec_int8bq.onnx was not found")

    monkeypatch.setattr(backends_mod, "opencv_backend", no_models)
    e = Engine(Policy(), parts=FakeParts(), scorer=FakeScorer(), registry=registry)
    v = e.check_image(img(33))
    assert v.decision is Decision.BLOCK and "sface" in v.error


def test_embeddings_of_another_model_are_never_compared(registry):
    other_model = fake_backend(PEOPLE, model_id="fake-00000000000f")
    e = engine(registry, backend=other_model)
    v = e.check_image(img(30))
    assert v.decision is Decision.ALLOW  # alice's stored vectors belong to another model


def test_auto_backend_stays_on_sface_until_everyone_has_insightface_embeddings(monkeypatch):
    sface = fake_backend({}, model_id="sface-aaaaaaaaaaaa")
    arc = fake_backend({}, model_id="arcface-bbbbbbbbbbbb")
    monkeypatch.setattr(backends_mod, "opencv_backend", lambda *a: sface)
    monkeypatch.setattr(backends_mod, "insightface_backend", lambda *a: arc)
    choose = backends_mod.choose_backend
    both = {"id_a": {"sface-aaaaaaaaaaaa", "arcface-bbbbbbbbbbbb"}}
    assert choose(Policy(), None, ["x"], both)[0] is arc
    mixed = {**both, "id_b": {"sface-aaaaaaaaaaaa"}}
    chosen, notes = choose(Policy(), None, ["x"], mixed)
    assert chosen is sface and "id_b" in notes[0] and "re-enrolled" in notes[0]
    forced, notes = choose(Policy(face_backend="insightface"), None, ["x"], mixed)
    assert forced is arc and "NOT PROTECTED" in notes[0] and "id_b" in notes[0]
    monkeypatch.setattr(backends_mod, "insightface_backend", lambda *a: None)
    with pytest.raises(ModelError, match="no InsightFace pack"):
        choose(Policy(face_backend="insightface"), None, ["x"], mixed)


def test_gallery_takes_the_max_over_each_identitys_photos():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((5, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    owners = np.array([1, 0, 1, 0, 1])  # unsorted: the gallery groups them
    g = Gallery("m", v, owners, [("a", "any"), ("b", "explicit")])
    for row, owner in zip(v, owners):
        m = g.best(row[None])[0]
        assert m.identity == "ab"[owner] and m.similarity == pytest.approx(1.0, abs=1e-5)
    q = -v[0]
    best = g.best(q[None])[0]
    expected = max(((v[owners == k] @ q).max(), "ab"[k]) for k in (0, 1))
    assert (best.similarity, best.identity) == (pytest.approx(expected[0]), expected[1])
    assert g.match(q[None], threshold=best.similarity + 1e-3) == [None]
    assert Gallery("m", np.zeros((0, 8), np.float32), np.zeros(0), []).best(v[:2]) == [None] * 2
    assert g.nbytes == 5 * 8 * 4 + 5 * 8
