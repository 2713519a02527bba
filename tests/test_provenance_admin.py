"""The admin's verify route (consent_guard/admin_api.verify_image, served by ComfyUI at
POST /consent_guard/verify, nodes/admin_routes.py): anyone may check a file's mark and
signature; the audit record it points to needs the admin passphrase."""
import base64
import io

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from consent_guard import admin, admin_api, provenance
from consent_guard.admin_api import Site
from consent_guard.audit import AuditLog
from consent_guard.policy import Policy
from consent_guard.verdict import Decision, Verdict

from test_provenance import picture, rivagan_installed  # noqa: F401 - a fixture

PASS = "correct horse battery"


pytestmark = pytest.mark.usefixtures("rivagan_installed")


@pytest.fixture
def site(tmp_path):
    admin_api.LIMITER.reset()
    home = tmp_path / "home"
    home.mkdir()
    yield Site(home=lambda: home, engine=lambda: (_ for _ in ()).throw(RuntimeError("none")))
    admin_api.LIMITER.reset()


def signed_png(home, record_id) -> str:
    st = provenance.stamp(picture(), Verdict(Decision.ALLOW), home=home, record_id=record_id,
                          policy=Policy(provenance_watermark=True, provenance_sign=True))
    meta = PngInfo()
    for key, text in st.text_chunks().items():
        meta.add_text(key, text)
    buf = io.BytesIO()
    Image.fromarray(st.pixels).save(buf, "PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode()


def test_verify_route_checks_a_file_without_a_passphrase(site):
    reply = admin_api.verify_image(site, signed_png(site.home(), 5), "a.png")
    assert reply.ok and reply.body["path"] == "a.png"
    assert reply.body["watermark"]["found"] and reply.body["watermark"]["mark_id"] == 5
    assert reply.body["signature"]["status"] == "valid"
    assert reply.body["signature"]["signed_by_this_machine"] is True
    assert reply.body["record"] is None


def test_verify_route_shows_the_record_to_the_admin_only(site):
    home = site.home()
    log = AuditLog(home / "audit.log")
    number = log.append("image", Verdict(Decision.ALLOW), source="comfyui", note="Save Image")
    data = signed_png(home, number)
    assert admin_api.verify_image(site, data, passphrase="x" * 10).body["code"] == \
        admin_api.NOT_SET_UP
    admin.create(home, PASS)
    assert admin_api.verify_image(site, data, passphrase="wrong one!").body["code"] == \
        admin_api.PASSPHRASE_WRONG
    reply = admin_api.verify_image(site, data, passphrase=PASS)
    assert reply.ok and [r["note"] for r in reply.body["record"]["records"]] == ["Save Image"]


def test_verify_route_refuses_what_is_not_an_image(site):
    assert admin_api.verify_image(site, None).status == 400
    assert admin_api.verify_image(site, "%%%").body["code"] == admin_api.BAD_REQUEST
    reply = admin_api.verify_image(site, base64.b64encode(b"not a picture").decode())
    assert reply.status == 400 and "cannot read the image" in reply.body["error"]
