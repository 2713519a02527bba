"""The ComfyUI adapter stamps what it saves: Consent Guard's Save Image node and, in enforce
mode, any output node (against the stand-ins of tests/comfy_standins.py). Blocked pictures
go through the detector doubles; the pictures themselves are a benign photo."""
import json
import sys

import numpy as np
import pytest
from PIL import Image

from consent_guard import Engine, Policy, provenance
from consent_guard.audit import AuditLog, read_records
from consent_guard.detectors.base import PartDetection

from conftest import FakeParts, FakeScorer
from test_comfy_enforce import comfy, run_node  # noqa: F401 - the fixture
from test_provenance import keyed_photo, rivagan_installed  # noqa: F401 - a fixture

torch = pytest.importorskip("torch")
ALLOW, CENSOR, BLOCK = 1, 10, 20
MARKED = dict(provenance_watermark=True, provenance_sign=True)


pytestmark = pytest.mark.usefixtures("rivagan_installed")


def batch(*keys):
    return torch.from_numpy(np.stack([keyed_photo(k, i) for i, k in enumerate(keys)])
                            .astype(np.float32) / 255)


def use_engine(monkeypatch, pkg, home, **policy):
    parts = FakeParts({CENSOR: [PartDetection("FEMALE_BREAST_EXPOSED", 0.8, (10, 10, 60, 60))]})
    engine = Engine(Policy(**policy), parts=parts,
                    scorer=FakeScorer(whole={CENSOR: 0.5, BLOCK: 0.97}))
    engine.audit = AuditLog(home / "audit.log")
    monkeypatch.setattr(sys.modules[pkg.__name__ + ".nodes.image_nodes"], "get_engine",
                        lambda: engine)
    return engine


def check(path, home):
    return provenance.verify_file(path, home=home)


def test_save_node_marks_and_signs_what_it_saves(comfy, monkeypatch):
    pkg, base, home, _ = comfy
    use_engine(monkeypatch, pkg, home, **MARKED)
    out = pkg.NODE_CLASS_MAPPINGS["ConsentGuardSaveImage"]().save_images(
        batch(ALLOW, BLOCK, CENSOR), "prov", extra_pnginfo={
            "workflow": {"n": 1}, provenance.METADATA_KEY: "forged by the workflow"})
    saved = sorted((base / "output").glob("prov_*.png"))
    assert len(saved) == 2 and [i["type"] for i in out["ui"]["images"]] == [
        "output", "temp", "output"]
    records = list(read_records(home / "audit.log"))
    assert [r["decision"] for r in records] == ["allow", "block", "censor"]
    for path, rec in zip(saved, (records[0], records[2])):
        result = check(path, home)
        assert result.signature.status == "valid", result.signature.problem
        assert result.signature.this_machine and result.signature.claim["audit_record"] == \
            rec["seq"]
        assert result.watermark["found"] and result.watermark["mark_id"] == rec["seq"]
        assert json.loads(Image.open(path).text["workflow"]) == {"n": 1}


def test_a_blocked_image_is_never_marked_or_saved(comfy, monkeypatch):
    pkg, base, home, _ = comfy
    use_engine(monkeypatch, pkg, home, **MARKED)
    stamped = []
    module = sys.modules[pkg.__name__ + ".consent_guard.provenance"]  # the adapter's copy
    real = module.stamp
    monkeypatch.setattr(module, "stamp", lambda px, v, **kw: stamped.append(v.decision.value)
                        or real(px, v, **kw))
    pkg.NODE_CLASS_MAPPINGS["ConsentGuardSaveImage"]().save_images(batch(BLOCK, BLOCK), "b")
    assert list((base / "output").glob("b_*")) == [] and stamped == []
    pkg.NODE_CLASS_MAPPINGS["ConsentGuardSaveImage"]().save_images(batch(BLOCK, ALLOW), "b")
    assert len(list((base / "output").glob("b_*"))) == 1 and stamped == ["allow"]
    for placeholder in (base / "temp").glob("*.png"):  # what is shown instead says why
        assert provenance.METADATA_KEY not in Image.open(placeholder).text


def test_marking_changes_no_decision(comfy, monkeypatch):
    pkg, base, home, _ = comfy
    node = pkg.NODE_CLASS_MAPPINGS["ConsentGuardSaveImage"]()
    notes = []
    for policy in ({}, MARKED):
        use_engine(monkeypatch, pkg, home, **policy)
        notes.append(node.save_images(batch(ALLOW, BLOCK, CENSOR), "d")["ui"]["consent_guard"])
    assert notes[0] == notes[1]


def test_stamp_failure_saves_nothing(comfy, monkeypatch):
    pkg, base, home, _ = comfy
    use_engine(monkeypatch, pkg, home, **MARKED)
    (home / "provenance.key").write_text("not a key\n")
    with pytest.raises(Exception, match="could not stamp the image"):
        pkg.NODE_CLASS_MAPPINGS["ConsentGuardSaveImage"]().save_images(batch(ALLOW, ALLOW), "f")
    assert list((base / "output").glob("f_*")) == []


class StockLikeSaver:
    """Writes its batch as nodes.SaveImage does: one extra_pnginfo for every image, each key a
    PNG text chunk, pixels truncated from 255 * value."""
    OUTPUT_NODE = True
    FUNCTION = "save"
    folder = None

    def save(self, images, extra_pnginfo=None):
        from PIL.PngImagePlugin import PngInfo

        for i, image in enumerate(images):
            meta = PngInfo()
            for key, value in (extra_pnginfo or {}).items():
                meta.add_text(key, json.dumps(value))
            arr = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(self.folder / f"stock_{i}.png", pnginfo=meta)
        return {"ui": {"images": []}}


def test_enforce_marks_and_signs_what_a_stock_saver_writes(comfy, monkeypatch):
    pkg, base, home, _ = comfy
    use_engine(monkeypatch, pkg, home, enforce=True)  # "auto": on in enforce mode
    StockLikeSaver.folder = base / "output"
    StockLikeSaver.folder.mkdir(parents=True, exist_ok=True)
    run_node(StockLikeSaver, images=batch(ALLOW, BLOCK, CENSOR), extra_pnginfo={"workflow": {}})
    saved = sorted(StockLikeSaver.folder.glob("stock_*.png"))
    assert len(saved) == 2  # the blocked one is left out
    decisions = []
    for path in saved:
        result = check(path, home)
        assert result.signature.status == "valid", result.signature.problem
        assert result.watermark["found"]
        decisions.append(result.signature.claim["verdict"]["decision"])
    assert decisions == ["allow", "censor"]
    records = {r["seq"]: r for r in read_records(home / "audit.log")}
    assert [records[check(p, home).signature.claim["audit_record"]]["decision"]
            for p in saved] == ["allow", "censor"]
