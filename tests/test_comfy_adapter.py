"""The ComfyUI nodes against stand-ins of ComfyUI's modules (tests/comfy_standins.py)."""
import json
import sys

import numpy as np
import pytest
from PIL import Image

from consent_guard import Engine, Policy
from consent_guard.detectors.base import PartDetection

import comfy_standins
from conftest import FakeParts, FakeScorer, keyed_image

torch = pytest.importorskip("torch")

ALLOW, CENSOR, BLOCK = 1, 10, 20


def batch(*keys, size=(64, 48)):
    return torch.from_numpy(np.stack([keyed_image(k, size) for k in keys]).astype(np.float32) / 255)


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "home"))
    pkg = comfy_standins.install(monkeypatch, tmp_path / "comfy")
    yield pkg, tmp_path / "comfy"
    for key in [k for k in sys.modules if k.startswith("custom_nodes_consent_guard_under_test")]:
        del sys.modules[key]


@pytest.fixture
def doubles(comfy, monkeypatch):
    """Replace the engine's detectors with doubles: key 10 censored, key 20 blocked."""
    pkg, base = comfy
    parts = FakeParts({CENSOR: [PartDetection("FEMALE_BREAST_EXPOSED", 0.8, (10, 10, 20, 20))]})
    engine = Engine(Policy(), parts=parts, scorer=FakeScorer(whole={CENSOR: 0.5, BLOCK: 0.97}))
    monkeypatch.setattr(sys.modules[pkg.__name__ + ".nodes.image_nodes"], "get_engine",
                        lambda: engine)
    return pkg, base, parts


def files(folder):
    return sorted(p.name for p in folder.rglob("*.png")) if folder.exists() else []


def test_mappings_exported_with_fixed_class_names(comfy):
    pkg, _ = comfy
    assert {"ConsentGuardCheckImage", "ConsentGuardSaveImage",
            "ConsentGuardPreviewImage"} <= set(pkg.NODE_CLASS_MAPPINGS)
    assert set(pkg.NODE_DISPLAY_NAME_MAPPINGS) == set(pkg.NODE_CLASS_MAPPINGS)
    image_nodes = sys.modules[pkg.__name__ + ".nodes.image_nodes"].NODE_CLASS_MAPPINGS
    assert set(image_nodes) <= set(pkg.NODE_CLASS_MAPPINGS)
    for cls in image_nodes.values():
        assert cls.INPUT_TYPES()["required"]["images"][0] == "IMAGE"
    for cls in pkg.NODE_CLASS_MAPPINGS.values():
        assert hasattr(cls, cls.FUNCTION)


def test_model_folder_is_registered(comfy):
    import folder_paths
    assert folder_paths.get_folder_paths("consent_guard") == [
        str(comfy[1] / "models" / "consent_guard")]


def test_save_writes_only_what_policy_allows(doubles):
    pkg, base, _ = doubles
    node = pkg.NODE_CLASS_MAPPINGS["ConsentGuardSaveImage"]()
    images = batch(ALLOW, BLOCK, CENSOR)
    out = node.save_images(images, "run", prompt={"1": {"class_type": "X"}},
                           extra_pnginfo={"workflow": {"n": 1}})
    assert files(base / "output") == ["run_00001_.png", "run_00002_.png"]
    ui = out["ui"]["images"]
    assert [i["type"] for i in ui] == ["output", "temp", "output"]
    assert "block" in out["ui"]["consent_guard"][1]
    saved = Image.open(base / "output" / "run_00001_.png")
    meta = json.loads(saved.text["consent_guard"])
    assert meta["decision"] == "allow" and json.loads(saved.text["prompt"]) == {"1": {"class_type": "X"}}
    assert np.array_equal(np.asarray(saved.convert("RGB")), keyed_image(ALLOW))
    censored = Image.open(base / "output" / "run_00002_.png")
    assert json.loads(censored.text["consent_guard"])["decision"] == "censor"
    assert not np.array_equal(np.asarray(censored.convert("RGB")), keyed_image(CENSOR))
    # the blocked image's placeholder is in temp/, and it is not the original
    ph = Image.open(base / "temp" / ui[1]["filename"])
    assert ph.size == (64, 48) and not np.array_equal(np.asarray(ph.convert("RGB")),
                                                        keyed_image(BLOCK))


def test_save_nothing_when_everything_is_blocked(doubles):
    pkg, base, _ = doubles
    pkg.NODE_CLASS_MAPPINGS["ConsentGuardSaveImage"]().save_images(batch(BLOCK, BLOCK), "x")
    assert files(base / "output") == []


def test_disable_metadata_keeps_verdict_but_drops_prompt(doubles, monkeypatch):
    pkg, base, _ = doubles
    mod = sys.modules[pkg.__name__ + ".nodes.image_nodes"]
    monkeypatch.setattr(mod.args, "disable_metadata", True)
    mod.ConsentGuardSaveImage().save_images(batch(ALLOW), "m", prompt={"a": 1})
    info = Image.open(base / "output" / "m_00001_.png").text
    assert "prompt" not in info and "consent_guard" in info


def test_preview_goes_to_temp_never_output(doubles):
    pkg, base, _ = doubles
    out = pkg.NODE_CLASS_MAPPINGS["ConsentGuardPreviewImage"]().save_images(batch(ALLOW, BLOCK))
    assert files(base / "output") == []
    assert [i["type"] for i in out["ui"]["images"]] == ["temp", "temp"]
    assert len(files(base / "temp")) == 2


def test_check_node_returns_every_frame_and_a_report(doubles):
    pkg, _, parts = doubles
    node = pkg.NODE_CLASS_MAPPINGS["ConsentGuardCheckImage"]()
    keys = [ALLOW] * 30 + [BLOCK, CENSOR]
    comfy_standins.ProgressBar.instances.clear()
    images, report = node.check(batch(*keys))
    assert tuple(images.shape) == (32, 48, 64, 3) and images.dtype == torch.float32
    rep = json.loads(report)
    assert rep["decision"] == "block" and len(rep["images"]) == 32
    assert [r["decision"] for r in rep["images"][-2:]] == ["block", "censor"]
    out = (images.numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(out[0], keyed_image(ALLOW))
    assert not np.array_equal(out[30], keyed_image(BLOCK))
    assert sum(parts.calls) == 32 and max(parts.calls) <= 16  # chunked, every frame checked
    assert comfy_standins.ProgressBar.instances[-1].current == 32


def test_model_failure_fails_closed_everywhere(comfy, tmp_path, monkeypatch):
    pkg, base = comfy
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "policy.toml").write_text(
        f'[models.paths]\nnudenet_320n = "{tmp_path / "missing.onnx"}"\n')
    nodes = pkg.NODE_CLASS_MAPPINGS
    with pytest.raises(RuntimeError, match="missing.onnx"):
        nodes["ConsentGuardSaveImage"]().save_images(batch(ALLOW), "f")
    with pytest.raises(RuntimeError, match="missing.onnx"):
        nodes["ConsentGuardCheckImage"]().check(batch(ALLOW))
    with pytest.raises(RuntimeError, match="missing.onnx"):
        nodes["ConsentGuardPreviewImage"]().save_images(batch(ALLOW))
    assert files(base / "output") == [] and files(base / "temp") == []


def test_broken_policy_fails_closed(comfy, tmp_path):
    pkg, base = comfy
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "policy.toml").write_text("[actions]\nnudity = 'sometimes'\n")
    with pytest.raises(RuntimeError, match="cannot read its policy"):
        pkg.NODE_CLASS_MAPPINGS["ConsentGuardSaveImage"]().save_images(batch(ALLOW), "p")
    assert files(base / "output") == []


def test_policy_edits_take_effect_without_restart(comfy, tmp_path):
    pkg, _ = comfy
    bridge = sys.modules[pkg.__name__ + ".nodes.comfy_bridge"]
    first = bridge.get_engine()
    assert bridge.get_engine() is first
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "policy.toml").write_text("[actions]\nnudity = 'block'\n")
    second = bridge.get_engine()
    assert second is not first and second.policy.action_for("nudity").value == "block"


def test_policy_change_invalidates_comfyui_cache(comfy, tmp_path):
    pkg, _ = comfy
    nodes = pkg.NODE_CLASS_MAPPINGS
    before = {name: cls.IS_CHANGED(filename_prefix="x") for name, cls in nodes.items()}
    assert nodes["ConsentGuardCheckImage"].IS_CHANGED() == before["ConsentGuardCheckImage"]
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "policy.toml").write_text("[actions]\nnudity = 'block'\n")
    after = {name: cls.IS_CHANGED(filename_prefix="x") for name, cls in nodes.items()}
    assert all(before[n] != after[n] for n in nodes)


def test_real_models_through_the_node(comfy, t1_jpg):
    pkg, base = comfy
    rgb = np.asarray(Image.open(t1_jpg).convert("RGB"))
    images = torch.from_numpy(rgb[None].astype(np.float32) / 255)
    bridge = sys.modules[pkg.__name__ + ".nodes.comfy_bridge"]
    try:
        bridge.get_engine().load()
    except Exception as exc:
        pytest.skip(f"models not installed: {exc}")
    out = pkg.NODE_CLASS_MAPPINGS["ConsentGuardSaveImage"]().save_images(images, "real")
    assert files(base / "output") == ["real_00001_.png"], out


# -- protected identities through the nodes ------------------------------------------------
PASS = "correct horse battery"
ALICE, BOB = 30, 31  # image keys: alice (scope any), bob (scope explicit)


@pytest.fixture
def identities(comfy, monkeypatch, tmp_path):
    """A registry in the ComfyUI user folder (alice: scope any, bob: scope explicit), an engine
    built by the bridge as in ComfyUI, and face doubles in place of the face models."""
    from conftest import FakeFaces, fake_backend
    from consent_guard.registry import Consent, Registry

    pkg, base = comfy
    home = tmp_path / "home"
    reg = Registry.create(home / "identities.db", PASS, key_file=home / "registry.key")
    reg.add("Alice", "any", Consent("Alice"), {"fake-000000000001": FakeFaces.vector("alice")[None]})
    reg.add("Bob", "explicit", Consent("Bob"), {"fake-000000000001": FakeFaces.vector("bob")[None]})
    bridge = sys.modules[pkg.__name__ + ".nodes.comfy_bridge"]
    engine = bridge.get_engine()
    engine._parts, engine._scorer = FakeParts(), FakeScorer()
    engine._injected_backend = fake_backend({ALICE: ["alice"], BOB: ["bob"]})
    return pkg, base, reg, engine


def test_bridge_opens_the_registry_with_the_key_file(identities):
    _, _, reg, engine = identities
    assert engine.registry is not None and len(engine.registry.identities()) == 2


def test_check_input_refuses_scope_any_and_passes_the_rest(identities):
    pkg, _, reg, _ = identities
    node = pkg.NODE_CLASS_MAPPINGS["ConsentGuardCheckInput"]()
    images = batch(ALLOW, BOB)
    assert node.check(images)[0] is images  # unchanged, not copied
    alice_id = reg.find("Alice").id
    with pytest.raises(RuntimeError, match="refuses input image 2 of 2: This picture shows a "
                                           "protected person") as err:
        node.check(batch(ALLOW, ALICE))
    # neither the name nor the registry id: the audit log has the id for the admin
    assert "Alice" not in str(err.value) and alice_id not in str(err.value)
    assert isinstance(err.value, pkg.nodes.comfy_bridge.ConsentGuardRefusal)
    assert err.value.kind == "input_protected"


def test_save_blocks_scope_any_and_names_only_the_id(identities):
    pkg, base, reg, _ = identities
    out = pkg.NODE_CLASS_MAPPINGS["ConsentGuardSaveImage"]().save_images(
        batch(ALICE, BOB), "who")
    assert files(base / "output") == ["who_00001_.png"]  # bob: scope explicit, not explicit
    assert [i["type"] for i in out["ui"]["images"]] == ["temp", "output"]
    assert reg.find("Alice").id in out["ui"]["consent_guard"][0]
    assert "Alice" not in json.dumps(out)


def test_enrolment_elsewhere_invalidates_the_cache_and_is_matched(identities, tmp_path):
    from conftest import FakeFaces
    from consent_guard.registry import Consent, Registry

    pkg, base, _, engine = identities
    node_cls = pkg.NODE_CLASS_MAPPINGS["ConsentGuardCheckImage"]
    before = node_cls.IS_CHANGED()
    engine._injected_backend.embedder.people_by_key[40] = ["carol"]
    assert json.loads(node_cls().check(batch(40))[1])["decision"] == "allow"
    cli_side = Registry.open(tmp_path / "home" / "identities.db", passphrase=PASS)
    cli_side.add("Carol", "any", Consent("Carol"),
                 {"fake-000000000001": FakeFaces.vector("carol")[None]})
    cli_side.close()
    assert node_cls.IS_CHANGED() != before
    assert json.loads(node_cls().check(batch(40))[1])["decision"] == "block"


def test_locked_registry_fails_closed(comfy, tmp_path, monkeypatch):
    from consent_guard.registry import Registry

    pkg, base = comfy
    monkeypatch.delenv("CONSENT_GUARD_PASSPHRASE", raising=False)
    Registry.create(tmp_path / "home" / "identities.db", PASS).close()  # no key file
    with pytest.raises(RuntimeError, match="cannot open the identity registry"):
        pkg.NODE_CLASS_MAPPINGS["ConsentGuardSaveImage"]().save_images(batch(ALLOW), "l")
    with pytest.raises(RuntimeError, match="cannot open the identity registry"):
        pkg.NODE_CLASS_MAPPINGS["ConsentGuardCheckInput"]().check(batch(ALLOW))
    assert files(base / "output") == []


def test_a_blocked_image_sends_a_toast_and_a_readable_placeholder(identities, monkeypatch):
    """The save node knows it blocked: the browser is told (web/js/refusals.js shows a toast),
    the run goes on, and the placeholder is drawn in the UI's language."""
    pkg, base, reg, _ = identities
    server = comfy_standins.make_server()
    monkeypatch.setitem(sys.modules, "server", server)
    instance = server.PromptServer.instance
    instance.client_id, instance.last_node_id = "browser", "12"
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(
        json.dumps({"Comfy.Locale": "id"}))
    out = pkg.NODE_CLASS_MAPPINGS["ConsentGuardSaveImage"]().save_images(batch(ALICE, BOB), "who")
    [(event, data, sid)] = instance.sent
    assert event == "consent_guard.refusal" and sid == "browser"
    assert data["kind"] == "output_protected" and data["stopped"] is False
    assert data["blocked"] == 1 and data["total"] == 2 and data["node"] == "12"
    assert data["language"] == "id"
    assert reg.find("Alice").id not in json.dumps(data) and "Alice" not in json.dumps(data)
    placeholder = out["ui"]["images"][0]
    assert placeholder["type"] == "temp"
    shown = np.asarray(Image.open(base / "temp" / placeholder["filename"]).convert("RGB"))
    from consent_guard.censor import placeholder as draw

    h, w = shown.shape[:2]
    assert np.array_equal(shown, draw(w, h, kind="output_protected", locale="id"))
    assert not np.array_equal(shown, draw(w, h, kind="output_protected", locale="en"))


def test_nothing_blocked_sends_nothing(identities, monkeypatch):
    pkg, base, _, _ = identities
    server = comfy_standins.make_server()
    monkeypatch.setitem(sys.modules, "server", server)
    server.PromptServer.instance.client_id = "browser"
    pkg.NODE_CLASS_MAPPINGS["ConsentGuardSaveImage"]().save_images(batch(BOB), "who")
    assert server.PromptServer.instance.sent == []
