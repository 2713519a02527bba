"""The provenance mark and the signed verdict (consent_guard/provenance.py, watermark.py) and
`consent-guard verify`. The mark runs on the real RivaGAN models (the invisible-watermark
wheel, installed by install.py with --no-deps); the pictures are benign and synthetic."""
import io
import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from consent_guard import cli, provenance, watermark
from consent_guard.audit import AuditLog
from consent_guard.models import ModelError, ModelResolver
from consent_guard.policy import Policy, PolicyError, policy_from_dict
from consent_guard.verdict import Decision, Reason, Verdict

from conftest import package_file

ALLOW = Verdict(Decision.ALLOW)
CENSOR = Verdict(Decision.CENSOR, reasons=(Reason("nudenet", "FEMALE_BREAST_EXPOSED", 0.8,
                                                  "nudity", Decision.CENSOR),), rule="censored")
BLOCK = Verdict(Decision.BLOCK, reasons=(Reason("open_nsfw", "whole_image", 0.97, "sexual",
                                                Decision.BLOCK),), rule="blocked")
ON = Policy(provenance_watermark=True, provenance_sign=True)


def require_rivagan() -> ModelResolver:
    """Skips the test when the RivaGAN models are not installed (install.py installs them)."""
    try:
        resolver = ModelResolver()
        resolver.resolve(watermark.ENCODER), resolver.resolve(watermark.DECODER)
    except ModelError as exc:
        pytest.skip(f"the RivaGAN models are not installed: {exc}")
    return resolver


@pytest.fixture
def rivagan_installed():
    require_rivagan()


@pytest.fixture(scope="module")
def marker():
    return watermark.Marker(require_rivagan(), "cpu")


def picture(seed=0, size=(384, 320)) -> np.ndarray:
    """A benign photo (scikit-image's public-domain astronaut portrait), cropped by `seed` and
    resized to `size`. RivaGAN was trained on natural video: on drawn gradients it may not
    take (docs/provenance.md), so the tests use a photograph."""
    photo = Image.open(package_file("skimage", "data/astronaut.png")).convert("RGB")
    left, top = (seed * 37) % 96, (seed * 53) % 96
    return np.asarray(photo.crop((left, top, left + 416, top + 416)).resize(size,
                                                                              Image.BILINEAR))


def keyed_photo(key: int, seed: int) -> np.ndarray:
    """A photo whose top-left red value is the detector doubles' key (conftest.key_of)."""
    img = picture(seed).copy()
    img[0, 0, 0] = key
    return img


def save_png(path, stamp: provenance.Stamp, extra=None):
    meta = PngInfo()
    for key, text in {**stamp.text_chunks(), **(extra or {})}.items():
        meta.add_text(key, text)
    Image.fromarray(stamp.pixels).save(path, pnginfo=meta)
    return path


def test_marked_and_signed_image_verifies(tmp_path, marker):
    home = tmp_path / "home"
    st = provenance.stamp(picture(), CENSOR, policy=ON, home=home, record_id=70001,
                          marker=marker)
    assert st.payload == f"{int(watermark.payload_bits(70001), 2):08x}"
    check = provenance.verify_file(save_png(tmp_path / "a.png", st), home=home, marker=marker)
    assert check.watermark["found"] and check.watermark["mark_id"] == 70001 % 65536
    assert check.watermark["tag_bits_matching"] == "16/16"
    sig = check.signature
    assert sig.status == "valid" and sig.this_machine is True, sig.problem
    assert sig.claim["audit_record"] == 70001 and sig.claim["verdict"]["decision"] == "censor"
    assert sig.claim["watermark"] == st.payload
    assert (home / "provenance.key").stat().st_mode & 0o077 == 0  # owner only


def test_the_mark_is_faint(marker):
    img = picture(1)
    marked = marker.embed(img, watermark.payload_bits(5))
    mse = np.mean((marked.astype(float) - img) ** 2)
    assert mse > 0 and 10 * np.log10(255 ** 2 / mse) > 38  # PSNR in dB


def test_mark_survives_jpeg_and_half_size(marker):
    marked = marker.embed(picture(2, (512, 512)), watermark.payload_bits(1234))
    buf = io.BytesIO()
    Image.fromarray(marked).save(buf, "JPEG", quality=50)
    half = Image.fromarray(marked).resize((256, 256), Image.BICUBIC)
    for shared in (Image.open(buf), half):
        reading = marker.read(np.asarray(shared.convert("RGB")))
        assert reading.found and reading.mark_id == 1234


def test_mark_survives_an_80_percent_centre_crop(marker):
    marked = marker.embed(picture(4, (640, 640)), watermark.payload_bits(4321))
    reading = marker.read(marked[64:576, 64:576])
    assert reading.found and reading.mark_id == 4321


class ScriptedReads(watermark.Marker):
    """A Marker whose decoder is a test double: `_read_at` returns the reading given for each
    side, and records the sides it was asked for."""

    def __init__(self, by_side, **kw):
        super().__init__(ModelResolver(manifest={}), "cpu", **kw)
        self.by_side, self.sides = by_side, []

    def _read_at(self, rgb, side):
        self.sides.append(side)
        return self.by_side[side]


def reading(bits: str, confidence: float) -> watermark.Reading:
    return watermark._reading(bits, confidence)


def test_read_keeps_the_reading_with_fewest_wrong_tag_bits():
    clean = reading(watermark.payload_bits(77), 0.90)
    one_off = reading(("0" if watermark.TAG[0] == "1" else "1") + clean.bits[1:], 0.99)
    m = ScriptedReads({100: one_off, 90: clean, 80: one_off}, grid=100)
    got = m.read(np.zeros((40, 30, 3), np.uint8))
    assert m.sides == [100, 90, 80]  # the grid, then as if a 90% and an 80% crop
    assert got is clean and got.mark_id == 77


def test_read_breaks_ties_by_confidence_and_finds_nothing_in_noise():
    sure, unsure = (reading(watermark.payload_bits(5), c) for c in (0.97, 0.80))
    m = ScriptedReads({192: unsure, 173: sure, 154: unsure}, grid=192)
    assert m.read(np.zeros((8, 8, 3), np.uint8)) is sure
    noise = [reading(b, 0.6) for b in ("0" * 32, "1" * 32, "01" * 16)]
    m = ScriptedReads(dict(zip((192, 173, 154), noise)), grid=192)
    assert not m.read(np.zeros((8, 8, 3), np.uint8)).found


def test_one_scale_reads_once():
    clean = reading(watermark.payload_bits(3), 0.9)
    m = ScriptedReads({256: clean}, grid=256, read_scales=(1.0,))
    assert m.read(np.zeros((8, 8, 3), np.uint8)) is clean and m.sides == [256]


def test_unmarked_image_is_not_found_and_unsigned(tmp_path, marker):
    path = tmp_path / "plain.png"
    Image.fromarray(picture(3)).save(path)
    check = provenance.verify_file(path, home=tmp_path / "home", marker=marker)
    assert check.watermark["found"] is False and check.watermark["mark_id"] is None
    assert check.signature.status == "absent"


def test_edited_verdict_text_fails_the_signature(tmp_path, marker):
    home = tmp_path / "home"
    st = provenance.stamp(picture(), CENSOR, policy=ON, home=home, record_id=3, marker=marker)
    edited = dict(st.summary, decision="allow", reasons=[])
    path = save_png(tmp_path / "e.png", st, {"consent_guard": json.dumps(edited)})
    sig = provenance.verify_file(path, home=home, marker=marker).signature
    assert sig.status == "invalid" and "verdict text differs" in sig.problem


def test_edited_signed_claim_fails_the_signature(tmp_path, marker):
    home = tmp_path / "home"
    st = provenance.stamp(picture(), CENSOR, policy=ON, home=home, record_id=3, marker=marker)
    st.signed["claim"]["verdict"] = dict(st.summary, decision="allow", reasons=[])
    st.summary = st.signed["claim"]["verdict"]  # both texts changed alike
    sig = provenance.verify_file(save_png(tmp_path / "c.png", st), home=home,
                                 marker=marker).signature
    assert sig.status == "invalid" and "signed text was edited" in sig.problem


def test_edited_pixels_fail_the_signature_but_keep_the_mark(tmp_path, marker):
    home = tmp_path / "home"
    st = provenance.stamp(picture(), ALLOW, policy=ON, home=home, record_id=9, marker=marker)
    st.pixels = st.pixels.copy()
    st.pixels[:20, :20] = 0
    check = provenance.verify_file(save_png(tmp_path / "p.png", st), home=home, marker=marker)
    assert check.signature.status == "invalid" and "pixels differ" in check.signature.problem
    assert check.watermark["found"] and check.watermark["mark_id"] == 9


def test_another_machines_signature_is_valid_but_not_ours(tmp_path, marker):
    st = provenance.stamp(picture(), ALLOW, policy=ON, home=tmp_path / "other", record_id=1,
                          marker=marker)
    path = save_png(tmp_path / "o.png", st)
    provenance.machine_key(tmp_path / "mine")
    sig = provenance.verify_file(path, home=tmp_path / "mine", marker=marker).signature
    assert sig.status == "valid" and sig.this_machine is False


def test_a_blocked_image_is_never_stamped(tmp_path):
    with pytest.raises(provenance.ProvenanceError, match="never stamped"):
        provenance.stamp(picture(), BLOCK, policy=ON, home=tmp_path)
    with pytest.raises(provenance.ProvenanceError):
        provenance.stamp(picture(), Verdict.failed("model missing"), policy=ON, home=tmp_path)
    assert not (tmp_path / "provenance.key").exists()


def test_missing_mark_model_fails_closed(tmp_path):
    broken = watermark.Marker(ModelResolver(manifest={}), "cpu")
    with pytest.raises(provenance.ProvenanceError, match="could not be made"):
        provenance.stamp(picture(), ALLOW, policy=ON, home=tmp_path, marker=broken)


def test_sign_only_and_off(tmp_path):
    sign_only = Policy(provenance_watermark=False, provenance_sign=True)
    st = provenance.stamp(picture(), ALLOW, policy=sign_only, home=tmp_path, record_id=2)
    assert st.payload is None and np.array_equal(st.pixels, picture())
    assert st.signed["claim"]["watermark"] is None
    assert not provenance.enabled(Policy())  # "auto" outside enforce mode: off


def test_batch_claims_pick_the_file_s_own(tmp_path, marker):
    home = tmp_path / "home"
    stamps = provenance.stamp_batch([picture(4), picture(5)], [ALLOW, CENSOR], [11, 12],
                                    policy=ON, home=home, marker=marker)
    signed = json.dumps(provenance.batch_metadata(stamps))
    for i, st in enumerate(stamps):
        meta = PngInfo()
        meta.add_text(provenance.METADATA_KEY, signed)
        Image.fromarray(st.pixels).save(tmp_path / f"{i}.png", pnginfo=meta)
        sig = provenance.verify_file(tmp_path / f"{i}.png", home=home, marker=marker).signature
        assert sig.status == "valid" and sig.claim["audit_record"] == 11 + i


def test_policy_switches():
    assert Policy(enforce=True).watermark_on and Policy(enforce=True).sign_on
    assert not Policy().watermark_on and not Policy().sign_on
    p = policy_from_dict({"enforce": True, "provenance": {"watermark": False}})
    assert not p.watermark_on and p.sign_on
    with pytest.raises(PolicyError, match=r"\[provenance\] sign must be true, false or"):
        policy_from_dict({"provenance": {"sign": "yes"}})
    with pytest.raises(PolicyError, match="unknown key"):
        policy_from_dict({"provenance": {"watermarks": True}})


def test_audit_append_gives_the_record_number(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    assert log.append("image", ALLOW, source="cli") == 1
    assert log.record("image", ALLOW, source="cli") is True
    assert log.append("image", ALLOW, source="cli") == 3
    assert provenance.find_record(tmp_path / "audit.log", 3)[0]["seq"] == 3
    assert [r["seq"] for r in provenance.find_record(tmp_path / "audit.log", 2, True)] == [2]


def test_payload_tag_and_id():
    bits = watermark.payload_bits(65536 + 7)
    assert len(bits) == 32 and bits.startswith(watermark.TAG)
    assert watermark.read_payload(bits).mark_id == 7
    two_off = ("0" if bits[0] == "1" else "1") + ("0" if bits[1] == "1" else "1") + bits[2:]
    assert watermark.read_payload(two_off).found
    three_off = two_off[:2] + ("0" if bits[2] == "1" else "1") + bits[3:]
    assert not watermark.read_payload(three_off).found
    assert not watermark.read_payload("1" * 32).found  # what flat pictures decode to


# -- the command line ------------------------------------------------------------------------------

def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_verify_json_and_exit_codes(tmp_path, monkeypatch, capsys, marker):
    home = tmp_path / "home"
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    st = provenance.stamp(picture(), ALLOW, policy=ON, home=home, record_id=4, marker=marker)
    good = save_png(tmp_path / "good.png", st)
    plain = tmp_path / "plain.png"
    Image.fromarray(picture(6)).save(plain)
    code, out, _ = run(capsys, "verify", "--json", str(good))
    row = json.loads(out)
    assert code == 0 and row["watermark"]["found"] and row["signature"]["status"] == "valid"
    assert row["signature"]["signed_by_this_machine"] is True
    code, out, _ = run(capsys, "verify", str(plain))
    assert code == 1 and "mark: not found" in out and "signature: absent" in out
    code, _, err = run(capsys, "verify", str(tmp_path / "nothing.png"))
    assert code == 2 and "no such file" in err


def test_cli_verify_record_needs_the_admin_passphrase(tmp_path, monkeypatch, capsys, marker):
    from consent_guard import admin

    home = tmp_path / "home"
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    log = AuditLog(home / "audit.log")
    log.append("image", ALLOW, source="cli")
    number = log.append("image", CENSOR, source="comfyui")
    st = provenance.stamp(picture(), CENSOR, policy=ON, home=home, record_id=number,
                          marker=marker)
    path = save_png(tmp_path / "r.png", st)
    code, _, err = run(capsys, "verify", "--record", str(path))
    assert code == 2 and "admin set-passphrase" in err
    admin.create(home, "correct horse")
    (tmp_path / "pw").write_text("wrong horse!\n")
    code, _, err = run(capsys, "verify", "--record", "--passphrase-file", str(tmp_path / "pw"),
                       str(path))
    assert code == 2 and "wrong admin passphrase" in err
    (tmp_path / "pw").write_text("correct horse\n")
    code, out, _ = run(capsys, "verify", "--json", "--record", "--passphrase-file",
                       str(tmp_path / "pw"), str(path))
    rec = json.loads(out)["record"]
    assert code == 0 and rec["by"] == "signature"
    assert [r["seq"] for r in rec["records"]] == [2] and rec["records"][0]["decision"] == "censor"


def test_cli_make_key_prints_the_fingerprint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "home"))
    code, out, _ = run(capsys, "verify", "--make-key")
    key = provenance.machine_key(tmp_path / "home", create=False)
    assert code == 0 and provenance.fingerprint(provenance.public_bytes(key)) in out
