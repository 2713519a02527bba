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
    for cls in pkg.NODE_CLASS_MAPPINGS.values():
        assert cls.INPUT_TYPES()["required"]["images"][0] == "IMAGE"
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
