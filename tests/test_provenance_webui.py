"""The A1111/Forge adapter stamps what the WebUI saves (a1111_adapter/checks.py,
stamp_for_save), against the stand-ins of tests/a1111_standins.py. Blocked pictures go
through the detector doubles; the pictures themselves are a benign photo."""
import sys

import numpy as np
import pytest
from PIL import Image

from consent_guard import provenance, watermark
from consent_guard.audit import AuditLog, read_records

from test_a1111_adapter import ALLOW, BLOCK, CENSOR, pixels, use_engine, webui  # noqa: F401
from test_provenance import keyed_photo, rivagan_installed  # noqa: F401 - a fixture

MARKED = dict(provenance_watermark=True, provenance_sign=True)


pytestmark = pytest.mark.usefixtures("rivagan_installed")


def photo(key: int, seed: int) -> Image.Image:
    return Image.fromarray(keyed_photo(key, seed))


def run_job(ns, keys):
    p = ns.processing.StableDiffusionProcessingTxt2Img(
        outpath_samples=str(ns.out / "samples"), outpath_grids=str(ns.out / "grids"),
        batch_size=len(keys), prompt="a red bicycle leaning on a wall",
        sample=lambda prompts: [photo(k, i) for i, k in enumerate(keys)])
    p.scripts = ns.runner
    ns.shared.state.begin()
    return p, ns.processing.process_images(p)


def capture_saves():
    """What each save hands the WebUI's writer once every callback ran: {file: pnginfo}."""
    seen = {}
    sys.modules["modules.script_callbacks"].on_before_image_saved(
        lambda params: seen.__setitem__(params.filename, dict(params.pnginfo)))
    return seen


def test_webui_saves_are_marked_and_signed(webui, monkeypatch, tmp_path):
    engine = use_engine(monkeypatch, **MARKED)
    engine.audit = AuditLog(tmp_path / "home" / "audit.log")
    saves = capture_saves()
    run_job(webui, (ALLOW, CENSOR, BLOCK))
    written = sorted((webui.out / "samples").glob("*.png"))
    assert len(written) == 2  # the blocked one's placeholder went elsewhere
    numbers = {r["seq"]: r for r in read_records(tmp_path / "home" / "audit.log")}
    decisions = []
    for path in written:
        on_disk = pixels(Image.open(path))
        sig = provenance.check_signature(saves[str(path)], on_disk, tmp_path / "home")
        assert sig.status == "valid" and sig.this_machine, sig.problem
        reading = watermark.Marker().read(on_disk)
        assert reading.found and reading.mark_id == sig.claim["audit_record"]
        assert "saved with the provenance mark" in numbers[sig.claim["audit_record"]]["note"]
        decisions.append(sig.claim["verdict"]["decision"])
    assert sorted(decisions) == ["allow", "censor"]
    assert not webui.errors.reported, webui.errors.reported


def test_a_blocked_picture_is_never_marked(webui, monkeypatch):
    use_engine(monkeypatch, **MARKED)
    saves = capture_saves()
    run_job(webui, (BLOCK,))
    assert list((webui.out / "samples").glob("*.png")) == []
    assert saves and not any(provenance.METADATA_KEY in info for info in saves.values())
    for placeholder in webui.blocked.glob("*.png"):
        assert not watermark.Marker().read(pixels(Image.open(placeholder))).found


def test_a_stamp_that_fails_saves_a_placeholder(webui, monkeypatch, tmp_path):
    use_engine(monkeypatch, **MARKED)
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "home" / "provenance.key").write_text("damaged\n")
    p, res = run_job(webui, (ALLOW,))
    written = sorted(webui.out.rglob("*.png"))
    assert all(pixels(Image.open(f)).std() < 40 for f in written)  # placeholders only
    assert not any(np.array_equal(pixels(Image.open(f)), np.asarray(photo(ALLOW, 0)))
                   for f in written)


def test_a_jpeg_gets_the_mark_but_no_signature(webui, monkeypatch, tmp_path):
    """A JPEG is encoded lossily after the save hook: its pixels could never match."""
    use_engine(monkeypatch, **MARKED)
    callbacks = sys.modules["modules.script_callbacks"]
    checks = sys.modules["a1111_adapter.checks"]
    params = callbacks.ImageSaveParams(photo(ALLOW, 3), None, str(tmp_path / "x.jpg"),
                                       {"parameters": "a red bicycle"})
    checks.before_image_saved(params)
    assert provenance.METADATA_KEY not in params.pnginfo
    assert json_decision(params.pnginfo) == "allow"
    assert watermark.Marker().read(pixels(params.image)).found
    params = callbacks.ImageSaveParams(photo(ALLOW, 4), None, str(tmp_path / "y.png"), {})
    checks.before_image_saved(params)
    assert provenance.METADATA_KEY in params.pnginfo


def json_decision(info: dict) -> str:
    import json

    return json.loads(info["consent_guard"])["decision"]
