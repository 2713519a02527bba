"""The A1111/Forge Consent Guard tab (a1111_adapter/ui_tab.py), its settings and its FastAPI
routes (a1111_adapter/api_routes.py), over consent_guard/admin_api.py and a real Host
(consent_guard/host.py) in a temporary home. The tab's actions are plain functions: they run
here without gradio. Where gradio or FastAPI is importable (Forge's venv), the tab is built
once and the routes are driven through FastAPI's TestClient; elsewhere those tests skip.
Enrolment uses a face backend double (conftest.fake_backend): no real photo of anyone."""
import io
import json
import sys
import tempfile
import types
from pathlib import Path

import pytest
from PIL import Image

from conftest import fake_backend, keyed_image

from a1111_adapter import api_routes, ui_tab
from consent_guard import admin, admin_api, expect
from consent_guard.host import Host

PASS = "correct horse battery"
LOCAL = "127.0.0.1"


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.delenv("CONSENT_GUARD_HOME", raising=False)
    monkeypatch.delenv("CONSENT_GUARD_PASSPHRASE", raising=False)
    admin_api.LIMITER.reset()
    host = Host(user_dir=lambda: str(tmp_path / "webui"), ui_name="WebUI")
    yield ui_tab.site_from_host(host)
    admin_api.LIMITER.reset()
    if host.engine is not None and host.engine.registry is not None:
        host.engine.registry.close()


def set_up(site, enforce=True, locked=True):
    msg, *_ = ui_tab.setup_action(site, PASS, PASS, "", enforce, locked, LOCAL)
    assert msg.startswith("**Done.**"), msg
    return site.home()


def code_of(msg: str) -> str:
    """The refusal code shown in a message: "**Refused (code):** ..."."""
    assert msg.startswith("**Refused ("), msg
    return msg[len("**Refused ("):msg.index(")")]


# -- status and set-up ------------------------------------------------------------------------

def test_status_of_a_fresh_machine(site):
    md = ui_tab.status_markdown(site)
    assert "**Set up:** no" in md and "**Enforce mode:** off" in md
    assert "**Admin lock:** off" in md and "no registry yet" in md
    assert str(site.home()) in md and "**Models:**" in md
    assert "**Models:**" not in ui_tab.status_markdown(site, show_models=False)


def test_setup_from_this_machine_then_never_again(site):
    msg, p, c, r, status = ui_tab.setup_action(site, PASS, PASS, "", True, True, LOCAL)
    assert msg.startswith("**Done.**") and "Enforce mode on, lock on" in msg
    assert (p, c, r) == ("", "", "")  # the passphrase fields are cleared
    assert "**Set up:** yes" in status and "**Enforce mode:** on" in status
    assert "**Admin lock:** on" in status and "0 protected" in status
    home = site.home()
    assert admin.verify(home, PASS) and admin.is_locked(home)
    assert "enforce = true" in (home / "policy.toml").read_text()
    msg = ui_tab.setup_action(site, "another passphrase", "another passphrase", "", False,
                              False, LOCAL)[0]
    assert code_of(msg) == "already_set_up"
    assert admin.verify(home, PASS) and admin.is_locked(home)  # nothing loosened


@pytest.mark.parametrize("p, c, code", [("", "", "passphrase_missing"),
                                        ("short", "short", "passphrase_too_short"),
                                        (PASS, PASS + "x", "passphrase_mismatch")])
def test_setup_refusals_have_their_codes(site, p, c, code):
    msg = ui_tab.setup_action(site, p, c, "", True, True, LOCAL)[0]
    assert code_of(msg) == code
    assert not admin.state(site.home()).has_passphrase


class FakeRequest:
    """What the tab reads of gr.Request: .client.host and .headers."""

    def __init__(self, host, headers=None):
        self.client = types.SimpleNamespace(host=host)
        self.headers = headers or {}


def test_setup_only_from_this_machine(site, monkeypatch):
    for client in ("192.168.1.20", "unknown",
                   ui_tab.client_of(FakeRequest(LOCAL, {"x-forwarded-for": "203.0.113.9"}))):
        msg = ui_tab.setup_action(site, PASS, PASS, "", True, True, client)[0]
        assert code_of(msg) == "setup_local_only", client
    # a webui started with --share: every visitor comes through a local tunnel
    shared = types.SimpleNamespace(cmd_opts=types.SimpleNamespace(share=True), opts=None)
    monkeypatch.setitem(sys.modules, "modules", types.SimpleNamespace(shared=shared))
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    client = ui_tab.client_of(FakeRequest(LOCAL))
    assert client.startswith("tunnel(--share)")
    assert code_of(ui_tab.setup_action(site, PASS, PASS, "", True, True, client)[0]) == \
        "setup_local_only"
    assert not admin.state(site.home()).has_passphrase
    monkeypatch.setattr(shared.cmd_opts, "share", False)
    assert ui_tab.client_of(FakeRequest("::1")) == "::1"


# -- policy, lock, audit ----------------------------------------------------------------------

def test_locked_policy_needs_the_passphrase(site):
    home = set_up(site)
    before = (home / "policy.toml").read_text()
    text, msg = ui_tab.policy_load_action(site)
    assert text == before and "Locked" in msg
    loose = before.replace("enforce = true", "enforce = false")
    msg, p, _ = ui_tab.policy_save_action(site, loose, "", "10.0.0.2")
    assert code_of(msg) == "passphrase_missing" and p == ""
    assert code_of(ui_tab.policy_save_action(site, loose, "wrong passphrase", "10.0.0.2")[0]) \
        == "passphrase_wrong"
    assert (home / "policy.toml").read_text() == before  # nothing loosened
    assert code_of(ui_tab.policy_save_action(site, "enforce = [", PASS, "10.0.0.2")[0]) == \
        "policy_invalid"
    msg, _, status = ui_tab.policy_save_action(site, loose, PASS, "10.0.0.2")
    assert msg.startswith("**Done.**") and "**Enforce mode:** off" in status
    assert expect.read(home)["policy"]["sha256"] == expect.sha256_of(home / "policy.toml")


def test_unlocked_policy_is_saved_without_a_passphrase(site):
    home = set_up(site, enforce=False, locked=False)
    text, msg = ui_tab.policy_load_action(site)
    assert "Not locked" in msg
    msg = ui_tab.policy_save_action(site, text + "\n# a comment\n", "", LOCAL)[0]
    assert msg.startswith("**Done.**") and "# a comment" in (home / "policy.toml").read_text()


def test_lock_and_unlock_always_need_the_passphrase(site):
    assert code_of(ui_tab.lock_action(site, True, PASS, LOCAL)[0]) == "not_set_up"
    home = set_up(site)
    assert code_of(ui_tab.lock_action(site, False, "", LOCAL)[0]) == "passphrase_missing"
    assert code_of(ui_tab.lock_action(site, False, "wrong passphrase", LOCAL)[0]) == \
        "passphrase_wrong"
    assert admin.is_locked(home)
    msg, p, status = ui_tab.lock_action(site, False, PASS, LOCAL)
    assert msg == "**Done.** Unlocked." and p == "" and "**Admin lock:** off" in status
    assert not admin.is_locked(home)
    assert ui_tab.lock_action(site, True, PASS, LOCAL)[0] == "**Done.** Locked."
    assert admin.is_locked(home)


def test_audit_log_needs_the_passphrase_and_shows_the_set_up(site):
    set_up(site)
    msg, table, p = ui_tab.audit_action(site, "", "7d", "any", LOCAL)
    assert code_of(msg) == "passphrase_missing" and table == "" and p == ""
    assert code_of(ui_tab.audit_action(site, "wrong passphrase", "7d", "any", LOCAL)[0]) == \
        "passphrase_wrong"
    msg, table, _ = ui_tab.audit_action(site, PASS, "7d", "any", LOCAL)
    assert msg.startswith("1 of 1 records"), msg
    assert "| a1111 tab | admin | allow |" in table
    assert ui_tab.audit_action(site, PASS, "7d", "block", LOCAL)[1] == "_No records._"
    assert code_of(ui_tab.audit_action(site, PASS, "yesterday-ish", "any", LOCAL)[0]) == \
        "bad_request"


def test_audit_table_escapes_what_it_shows():
    table = ui_tab.audit_markdown([{"time": "t", "source": "<b>x</b>|y", "kind": "prompt",
                                    "decision": "block", "categories": ["a", "b"]}])
    assert "&lt;b&gt;x&lt;/b&gt;&#124;y" in table and "| a, b |" in table


def test_wrong_passphrases_are_limited_per_client(site):
    set_up(site)
    for _ in range(5):
        assert code_of(ui_tab.lock_action(site, False, "wrong passphrase", "10.0.0.7")[0]) == \
            "passphrase_wrong"
    assert code_of(ui_tab.lock_action(site, False, PASS, "10.0.0.7")[0]) == "too_many"
    assert admin.is_locked(site.home())
    # another address is not locked out, and no passphrase is not a guess
    assert code_of(ui_tab.lock_action(site, False, "", "10.0.0.8")[0]) == "passphrase_missing"
    assert ui_tab.lock_action(site, False, PASS, "10.0.0.8")[0] == "**Done.** Unlocked."


# -- enrolment --------------------------------------------------------------------------------

def png_file(folder: Path, name: str, key: int) -> Path:
    buf = io.BytesIO()
    Image.fromarray(keyed_image(key, (96, 64))).save(buf, format="PNG")
    path = folder / name
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture
def upload_dir():
    """Uploads as gradio leaves them: files in the temporary folder."""
    with tempfile.TemporaryDirectory(prefix="gradio_standin_") as folder:
        yield Path(folder)


@pytest.fixture
def fake_faces(monkeypatch):
    """The face backend double for every enrolment: key 7 shows one person."""
    from consent_guard import identities
    from consent_guard.faces import enrol as enrol_checks

    backend = fake_backend({7: ["Pat Example"]})
    monkeypatch.setattr(enrol_checks, "ENROL_MIN_FACE_PX", 40)  # the double's faces are 48 px
    monkeypatch.setattr(identities, "available_backends", lambda *a, **k: ([backend], []))
    return backend


ENROL = dict(name="Pat Example", aliases="Pat, P. Example", scope="any", consent_by="Pat Example",
             on_behalf_of="", consent_date="2026-01-31", note="asked in person")


def enrol(site, files, passphrase=PASS, client=LOCAL, **fields):
    f = {**ENROL, **fields}
    return ui_tab.enrol_action(site, passphrase, "", f["name"], f["aliases"], f["scope"],
                               f["consent_by"], f["on_behalf_of"], f["consent_date"],
                               f["note"], files, client)


def test_enrol_clears_the_form_and_drops_the_uploads(site, fake_faces, upload_dir):
    set_up(site)
    photo = png_file(upload_dir, "pat.png", 7)
    out = enrol(site, [str(photo)])
    msg, p, r, name, aliases, scope, by, behalf, date, note, photos, status = out
    assert msg.startswith("**Done.** Pat Example is protected (scope any"), msg
    assert (p, r, name, aliases, scope, by, behalf, date, note, photos) == \
        ("", "", "", "", "explicit", "", "", "", "", None)
    assert "1 protected" in status
    assert not photo.exists()  # gradio's temporary copy is gone
    reg = site.engine().registry
    assert [i.name for i in reg.identities()] == ["Pat Example"]
    assert reg.identities()[0].scope == "any"


def test_enrol_refused_keeps_the_text_not_the_secrets(site, fake_faces, upload_dir):
    set_up(site)
    photo = png_file(upload_dir, "pat.png", 7)
    out = enrol(site, [str(photo)], passphrase="wrong passphrase")
    assert code_of(out[0]) == "passphrase_wrong"
    assert out[1:3] == ("", "") and out[3] == "Pat Example" and out[10] is None
    assert not photo.exists()
    assert len(site.engine().registry.identities()) == 0


def test_enrol_names_what_is_missing(site, fake_faces):
    set_up(site)
    out = enrol(site, [], passphrase="", name=" ", consent_by="")
    assert code_of(out[0]) == "passphrase_missing"
    assert "Missing: name, consent given by, admin passphrase, photo." in out[0]
    assert code_of(enrol(site, [], scope="everything")[0]) == "missing"


def test_enrol_says_which_photo_was_not_used(site, fake_faces, upload_dir):
    set_up(site)
    no_face = png_file(upload_dir, "landscape.png", 3)
    text = upload_dir / "notes.txt"
    text.write_text("not an image")
    out = enrol(site, [str(no_face), str(text)])
    assert "nothing was enrolled" in out[0]
    assert "landscape.png: no face found" in out[0]
    assert "notes.txt: not an image" in out[0]


def test_photos_from_gradio_3_and_4():
    """gradio 4 hands paths, gradio 3 tempfile wrappers with .name; a dict with "path" too."""
    with tempfile.TemporaryDirectory() as folder:
        a, b, c = (Path(folder) / n for n in ("a.png", "b.png", "c.png"))
        for path in (a, b, c):
            path.write_bytes(b"bytes of " + path.name.encode())
        photos = ui_tab.read_photos([str(a), types.SimpleNamespace(name=str(b)),
                                     {"path": str(c)}, str(Path(folder) / "gone.png")])
    assert [(p.source, p.data) for p in photos[:3]] == [
        ("a.png", b"bytes of a.png"), ("b.png", b"bytes of b.png"), ("c.png", b"bytes of c.png")]
    assert photos[3].data is None and photos[3].reason.startswith("not read")


def test_a_file_outside_the_temporary_folder_is_not_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    keep = tmp_path / "keep.png"
    keep.write_bytes(b"x")
    assert ui_tab.read_photos([str(keep)])[0].data == b"x" and keep.exists()


# -- settings ---------------------------------------------------------------------------------

def test_settings_hold_only_display_options(monkeypatch):
    added = {}

    class OptionInfo:
        def __init__(self, default=None, label="", component=None, component_args=None,
                     section=None, **kw):
            self.default, self.label, self.section = default, label, section

    opts = types.SimpleNamespace(add_option=lambda key, info: added.__setitem__(key, info))
    shared = types.SimpleNamespace(opts=opts, OptionInfo=OptionInfo)
    monkeypatch.setitem(sys.modules, "modules", types.SimpleNamespace(shared=shared))
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    ui_tab.on_ui_settings()
    assert set(added) == {ui_tab.OPT_SHOW_MODELS, ui_tab.OPT_AUDIT_ROWS}
    assert {info.section for info in added.values()} == {("consent_guard", "Consent Guard")}
    opts.consent_guard_audit_rows = 1
    assert ui_tab._opt(ui_tab.OPT_AUDIT_ROWS, 200) == 1


# -- the HTTP routes, without FastAPI ---------------------------------------------------------

JSON = {"content-type": "application/json"}


def call(site, method, path, data=None, client=LOCAL, headers=JSON):
    body = json.dumps(data).encode() if data is not None else b""
    return api_routes.handle(site, method, path, body, headers, client)


def test_routes_set_up_locally_then_admin_actions(site):
    status = call(site, "GET", api_routes.STATUS_PATH)
    assert status.status == 200 and status.body["set_up"] is False
    assert call(site, "GET", api_routes.SETUP_PATH).body["set_up"] is False
    setup = {"passphrase": PASS, "passphrase_confirm": PASS, "enforce": True, "locked": True}
    refused = call(site, "POST", api_routes.SETUP_PATH, setup, client="192.168.0.9")
    assert refused.status == 403 and refused.body["code"] == "setup_local_only"
    done = call(site, "POST", api_routes.SETUP_PATH, setup)
    assert done.status == 200 and done.body["enforce"] is True and done.body["locked"] is True
    body = call(site, "GET", api_routes.STATUS_PATH).body
    assert body["set_up"] and body["locked"] and body["enforce"]
    assert body["setup"]["registry"]["identities"] == 0
    assert PASS not in json.dumps(body)
    policy = call(site, "GET", api_routes.POLICY_PATH).body
    assert policy["locked"] and "enforce = true" in policy["text"]
    loose = {"text": policy["text"].replace("enforce = true", "enforce = false")}
    assert call(site, "POST", api_routes.POLICY_PATH, loose).body["code"] == "passphrase_missing"
    assert call(site, "POST", api_routes.POLICY_PATH, {**loose, "passphrase": "nope nope"}
                ).body["code"] == "passphrase_wrong"
    assert call(site, "GET", api_routes.STATUS_PATH).body["enforce"] is True
    audit = call(site, "POST", api_routes.AUDIT_PATH, {"passphrase": PASS, "limit": 5})
    assert audit.status == 200 and audit.body["records"][-1]["kind"] == "admin"
    assert call(site, "POST", api_routes.LOCK_PATH, {"locked": False}).body["code"] == \
        "passphrase_missing"
    assert call(site, "POST", api_routes.LOCK_PATH, {"locked": False, "passphrase": PASS}
                ).status == 200
    assert not admin.is_locked(site.home())


def test_routes_refuse_cross_site_and_non_json_posts(site):
    lock = {"locked": True, "passphrase": PASS}
    assert call(site, "POST", api_routes.LOCK_PATH, lock, headers={"content-type": "text/plain"}
                ).body["code"] == "bad_request"
    evil = {**JSON, "origin": "https://evil.example", "host": "127.0.0.1:7860"}
    reply = call(site, "POST", api_routes.LOCK_PATH, lock, headers=evil)
    assert reply.status == 403 and reply.body["code"] == "cross_origin"
    same = {**JSON, "origin": "http://127.0.0.1:7860", "host": "127.0.0.1:7860"}
    assert call(site, "POST", api_routes.LOCK_PATH, lock, headers=same).body["code"] == \
        "not_set_up"
    assert call(site, "GET", "/consent_guard/nothing").status == 404
    assert call(site, "POST", api_routes.STATUS_PATH, {}).status == 405


# -- with gradio / FastAPI where they are importable (Forge's venv) ---------------------------

def test_the_tab_builds_with_gradio(site):
    gr = pytest.importorskip("gradio")
    if not hasattr(gr, "Blocks"):  # a folder named gradio on sys.path (Gradio's /tmp/gradio)
        pytest.skip(f"no gradio package here (found a folder: {list(gr.__path__)})")
    tab = ui_tab.build_tab(gr, lambda: site)
    assert isinstance(tab, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in tab.blocks.values()}
    assert {"consent_guard_status", "consent_guard_setup_go", "consent_guard_enrol_go",
            "consent_guard_policy_text", "consent_guard_audit_table"} <= ids


def test_routes_through_fastapi(site):
    fastapi = pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    app = fastapi.FastAPI()
    assert api_routes.register(app, lambda: site) is True
    assert api_routes.register(app, lambda: site) is False  # on_app_started again
    client = TestClient(app)
    r = client.get(api_routes.STATUS_PATH)
    assert r.status_code == 200 and r.json()["set_up"] is False
    assert r.headers["cache-control"] == "no-store"
    setup = {"passphrase": PASS, "passphrase_confirm": PASS, "enforce": True, "locked": True}
    r = client.post(api_routes.SETUP_PATH, json=setup)  # TestClient's peer is "testclient"
    assert r.status_code == 403 and r.json()["code"] == "setup_local_only"
    r = client.post(api_routes.LOCK_PATH, content=b'{"locked": true}',
                    headers={"content-type": "text/plain"})
    assert r.status_code == 400
    set_up(site)
    r = client.post(api_routes.LOCK_PATH, json={"locked": False, "passphrase": "nope nope"})
    assert r.status_code == 403 and r.json()["code"] == "passphrase_wrong"
    r = client.post(api_routes.AUDIT_PATH, json={"passphrase": PASS})
    assert r.status_code == 200 and r.json()["total"] == 1
