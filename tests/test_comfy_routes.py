"""The enrol dialog's HTTP routes (nodes/routes.py) against the ComfyUI stand-ins: the handlers
are called with a stand-in request that implements what they use of aiohttp's
(content_type, multipart() -> next() -> part.name / .filename / read_chunk() / release()).
The real aiohttp server is exercised by tests/test_comfyui_integration.py."""
from __future__ import annotations

import asyncio
import io
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

import comfy_standins

PASS = "correct horse battery"


class FakePart:
    def __init__(self, name, data, filename=None):
        self.name, self.filename = name, filename
        self._data = data.encode() if isinstance(data, str) else data
        self._pos = 0

    async def read_chunk(self, size=8192):
        chunk = self._data[self._pos:self._pos + size]
        self._pos += len(chunk)
        return chunk

    async def release(self):
        self._pos = len(self._data)


class FakeReader:
    def __init__(self, parts):
        self._parts = list(parts)

    async def next(self):
        return self._parts.pop(0) if self._parts else None


class FakeRequest:
    def __init__(self, fields=None, photos=(), content_type="multipart/form-data"):
        self.content_type = content_type
        self.parts = [FakePart(k, v) for k, v in (fields or {}).items()]
        self.parts += [FakePart("photo", data, filename) for filename, data in photos]
        self.remote = "192.0.2.7"

    async def multipart(self):
        return FakeReader(self.parts)


def png(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


GREY = png(Image.new("RGB", (200, 200), (127, 127, 127)))
NOISE = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)))


def form(**overrides):
    fields = {"passphrase": PASS, "passphrase_confirm": PASS, "name": "Ms Example",
              "aliases": "Miss E, Em ,", "scope": "any", "consent_by": "Ms Example",
              "on_behalf_of": "", "consent_date": "2024-05-01", "note": "asked in person"}
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not None}


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONSENT_GUARD_PASSPHRASE", raising=False)
    pkg = comfy_standins.install(monkeypatch, tmp_path / "comfy")
    yield pkg
    for key in [k for k in sys.modules if k.startswith("custom_nodes_consent_guard_under_test")]:
        del sys.modules[key]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def routes(comfy, monkeypatch):
    """nodes/routes.py; its logic is the package's consent_guard/admin_api.py (routes.admin_api),
    whose one limiter is replaced by one on a test clock."""
    mod = sys.modules[comfy.__name__ + ".nodes.routes"]
    clock = Clock()
    limiter = mod.admin_api.PassphraseLimiter(clock=clock)
    monkeypatch.setattr(mod.admin_api, "LIMITER", limiter)
    monkeypatch.setattr(mod, "LIMITER", limiter)
    monkeypatch.setattr(mod, "test_clock", clock, raising=False)  # for the tests to advance
    return mod


@pytest.fixture
def real_faces(routes):
    from consent_guard.faces.backends import opencv_backend
    from consent_guard.models import ModelError, ModelResolver
    from consent_guard.policy import Policy

    try:
        opencv_backend(Policy(), ModelResolver())
    except ModelError as exc:
        pytest.skip(f"default face backend unavailable: {exc}")
    return routes


def enroll(routes, fields=None, photos=(), **kw):
    reply = asyncio.run(routes.handle_enroll(FakeRequest(fields, photos, **kw)))
    json.dumps(reply.body)  # what aiohttp's json_response will send must be JSON
    return reply


def status(routes):
    return asyncio.run(routes.handle_status(FakeRequest()))


def make_registry(tmp_path):
    from consent_guard.registry import Registry

    home = tmp_path / "home"
    Registry.create(home / "identities.db", PASS, key_file=home / "registry.key").close()


# -- registration ----------------------------------------------------------------------------

def test_no_routes_and_no_failure_without_a_server(comfy):
    routes = sys.modules[comfy.__name__ + ".nodes.routes"]
    assert "server" not in sys.modules
    assert routes.register_with_comfyui() is False
    assert comfy.WEB_DIRECTORY == "./web" and "WEB_DIRECTORY" in comfy.__all__
    assert set(comfy.__all__) == {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS",
                                  "WEB_DIRECTORY"}


def test_routes_registered_on_the_running_server(monkeypatch, tmp_path):
    """Loaded as ComfyUI loads it while a PromptServer exists: every route is added to its
    RouteTableDef (stand-ins of server.PromptServer and aiohttp.web)."""
    from comfy_standins import RouteTable

    server = types.ModuleType("server")
    server.PromptServer = type("PromptServer", (), {})
    server.PromptServer.instance = types.SimpleNamespace(routes=RouteTable())
    aiohttp, web = types.ModuleType("aiohttp"), types.ModuleType("aiohttp.web")
    web.json_response = lambda body, status, headers: (status, body, headers)
    aiohttp.web = web
    for name, mod in (("server", server), ("aiohttp", aiohttp), ("aiohttp.web", web)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "home"))
    pkg = comfy_standins.install(monkeypatch, tmp_path / "comfy")
    try:
        table = server.PromptServer.instance.routes
        assert [(r.method, r.path) for r in table] == [
            ("GET", "/consent_guard/identities/status"),
            ("POST", "/consent_guard/identities/enroll"),
            ("GET", "/consent_guard/status"), ("GET", "/consent_guard/policy"),
            ("POST", "/consent_guard/policy"), ("POST", "/consent_guard/audit"),
            ("GET", "/consent_guard/setup"), ("POST", "/consent_guard/setup"),
            ("POST", "/consent_guard/lock"), ("POST", "/consent_guard/verify")]
        code, body, headers = asyncio.run(table[0].handler(FakeRequest()))
        assert code == 200 and body["registry_exists"] is False and body["enrolled"] == 0
        assert headers["Cache-Control"] == "no-store"
        code, body, _ = asyncio.run(table[1].handler(FakeRequest({"name": "x"})))
        assert code == 400 and "Missing" in body["error"]
        routes = sys.modules[pkg.__name__ + ".nodes.routes"]
        assert routes.register_with_comfyui() is False  # imported again: not added twice
        assert len(table) == 10
    finally:
        for key in [k for k in sys.modules if k.startswith(pkg.__name__)]:
            del sys.modules[key]


# -- validation ------------------------------------------------------------------------------

def test_missing_fields_are_named(routes):
    reply = enroll(routes, form(name=None, consent_by=" ", passphrase=None))
    assert reply.status == 400 and not reply.body["ok"]
    for missing in ("name", "consent given by", "admin passphrase", "photo"):
        assert missing in reply.body["error"]


@pytest.mark.parametrize("fields, message", [
    ({"scope": "everything"}, "scope must be one of explicit, any"),
    ({"consent_date": "last tuesday"}, "YYYY-MM-DD"),
    ({"note": "x" * 5000}, "too long"),
])
def test_invalid_fields(routes, fields, message):
    reply = enroll(routes, form(**fields), [("a.png", GREY)])
    assert reply.status == 400 and message in reply.body["error"]


def test_not_multipart(routes):
    reply = enroll(routes, form(), [("a.png", GREY)], content_type="application/json")
    assert reply.status == 400 and "multipart/form-data" in reply.body["error"]


def test_a_new_registry_needs_the_passphrase_twice_and_long_enough(routes):
    reply = enroll(routes, form(passphrase_confirm="something else"), [("a.png", GREY)])
    assert reply.status == 400 and "type it twice" in reply.body["error"]
    assert PASS not in json.dumps(reply.body)
    reply = enroll(routes, form(passphrase="short", passphrase_confirm="short"),
                   [("a.png", GREY)])
    assert reply.status == 400 and "at least 8" in reply.body["error"]


def test_unreadable_and_oversized_photos_get_a_reason_each(routes, monkeypatch):
    seen = []

    def refuse_all(policy, home, passphrase, photos, **kw):
        seen.extend(p.shape for p in photos)
        raise routes.admin_api.EnrolmentRefused([routes.admin_api.PhotoCheck(
            "<image>", False, "no face found") for _ in photos])

    monkeypatch.setattr(routes.admin_api, "enrol_person", refuse_all)
    mb = 2 ** 20
    monkeypatch.setattr(routes, "MAX_PHOTO_BYTES", 1 * mb)
    monkeypatch.setattr(routes, "MAX_TOTAL_BYTES", 2 * mb)
    monkeypatch.setattr(routes, "MAX_PHOTOS", 6)
    padding = b"\0" * (mb * 7 // 10)  # after the PNG's end: read, ignored by the decoder
    reply = enroll(routes, form(), [("notes.txt", b"hello, not an image"),
                                    ("C:\\Users\\me\\big.png", b"\0" * (2 * mb)),
                                    ("cut.png", NOISE[:len(NOISE) // 2] + padding),
                                    ("", GREY + padding), ("c.png", GREY + padding),
                                    ("d.png", GREY), ("e.png", GREY)])
    assert reply.status == 400 and "nothing was enrolled" in reply.body["error"]
    assert [p["source"] for p in reply.body["photos"]] == [
        "notes.txt", "big.png", "cut.png", "photo 4", "c.png", "d.png", "e.png"]
    reasons = [p["reason"] for p in reply.body["photos"]]
    assert reasons[0] == "not an image, or a format Pillow cannot read"
    assert reasons[1] == "not read: file over 1 MB"
    assert reasons[2].startswith("corrupt or truncated image")
    assert reasons[3] == reasons[5] == "no face found"
    assert reasons[4] == "not read: the photos together are over 2 MB"
    assert reasons[6] == "not read: at most 6 photos at a time"
    assert seen == [(200, 200, 3), (200, 200, 3)]
    assert not any(p["ok"] for p in reply.body["photos"])
    assert not (routes.home() / "identities.db").exists()  # nothing created


# -- passphrase ------------------------------------------------------------------------------

def test_wrong_passphrase_is_403_and_never_echoed(routes, tmp_path):
    make_registry(tmp_path)
    wrong = "my-secret-guess-1234"
    reply = enroll(routes, form(passphrase=wrong, passphrase_confirm=None), [("a.png", GREY)])
    assert reply.status == 403 and reply.body == {
        "ok": False, "code": "passphrase_wrong",
        "error": "Wrong admin passphrase: nothing was enrolled. Check it and type it again."}
    assert wrong not in json.dumps(reply.body) and PASS not in json.dumps(reply.body)


def test_wrong_passphrases_are_rate_limited(routes, tmp_path):
    make_registry(tmp_path)
    bad = form(passphrase="guess number x", passphrase_confirm=None)
    for _ in range(5):
        routes.test_clock.now += 5
        assert enroll(routes, bad, [("a.png", GREY)]).status == 403
    for attempt in (bad, form(passphrase_confirm=None)):  # even the right one, while locked
        reply = enroll(routes, attempt, [("a.png", GREY)])
        assert reply.status == 429 and reply.headers["Retry-After"] == "60"
        assert reply.body["retry_after"] == 60
    routes.test_clock.now += 61
    assert enroll(routes, bad, [("a.png", GREY)]).status == 403  # allowed to try again


def test_failures_outside_the_window_do_not_add_up(routes, tmp_path):
    make_registry(tmp_path)
    bad = form(passphrase="guess number y", passphrase_confirm=None)
    for _ in range(8):
        routes.test_clock.now += 20  # 3 per minute
        assert enroll(routes, bad, [("a.png", GREY)]).status == 403


# -- enrolment -------------------------------------------------------------------------------

def test_fields_reach_enrol_person_as_given(routes, monkeypatch, tmp_path):
    """A test double in place of enrol_person: what the route hands it, and what it answers."""
    from consent_guard.faces.enrol import PhotoCheck
    from consent_guard.identities import Enrolment
    from consent_guard.registry import Identity

    calls = []

    def fake_enrol(policy, home, passphrase, **kw):
        calls.append((policy, home, passphrase, kw))
        ident = Identity("id_0123456789ab", kw["name"], kw["scope"], tuple(kw["aliases"]),
                         kw["consent"])
        return Enrolment(ident, [PhotoCheck("<image>", True, "one face, 200 px, score 0.95")],
                         ["opencv"], ["insightface: no pack"])

    monkeypatch.setattr(routes.admin_api, "enrol_person", fake_enrol)
    sideways = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    photo = png(sideways, format="JPEG", exif=exif.tobytes())
    reply = enroll(routes, form(), [("side.jpg", photo), ("notes.txt", b"nope")])
    assert reply.status == 200, reply.body
    assert reply.body == {
        "ok": True, "id": "id_0123456789ab", "name": "Ms Example", "scope": "any",
        "photos": [{"source": "side.jpg", "ok": True, "reason": "one face, 200 px, score 0.95"},
                   {"source": "notes.txt", "ok": False,
                    "reason": "not an image, or a format Pillow cannot read"}],
        "backends": ["opencv"], "notes": ["insightface: no pack"]}
    [(policy, home, passphrase, kw)] = calls
    assert passphrase == PASS and home == routes.home()
    assert kw["aliases"] == ["Miss E", "Em"] and kw["scope"] == "any"
    assert kw["consent"].to_dict() == {"by": "Ms Example", "on_behalf_of": "",
                                       "at": "2024-05-01", "note": "asked in person"}
    [pixels] = kw["photos"]
    assert pixels.dtype == np.uint8 and pixels.shape == (40, 20, 3)  # EXIF-transposed, RGB
    assert kw["model_dirs"] == [tmp_path / "comfy" / "models" / "consent_guard"]
    assert kw["insightface_dirs"] == [tmp_path / "comfy" / "models" / "insightface"]


def test_model_error_is_500_with_the_message(routes, monkeypatch):
    def broken(*a, **kw):  # the package's own ModelError, as ComfyUI loads it
        raise routes.admin_api.ModelError("No face backend can run here: sface weights missing")

    monkeypatch.setattr(routes.admin_api, "enrol_person", broken)
    reply = enroll(routes, form(), [("a.png", GREY)])
    assert reply.status == 500 and reply.body["error"] == (
        "The face models cannot run: No face backend can run here: sface weights missing")


def test_broken_policy_is_500_with_the_message(routes, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "policy.toml").write_text("[actions]\nnudity = 'sometimes'\n")
    reply = enroll(routes, form(), [("a.png", GREY)])
    assert reply.status == 500 and "cannot read its policy" in reply.body["error"]
    body = status(routes).body
    assert body["enrolled"] is None and "cannot read its policy" in body["problem"]


def test_photo_without_a_face_is_refused_with_the_reason(real_faces):
    reply = enroll(real_faces, form(), [("grey.png", GREY), ("text.txt", b"plain text")])
    assert reply.status == 400, reply.body
    assert reply.body["photos"] == [
        {"source": "grey.png", "ok": False, "reason": "no face found"},
        {"source": "text.txt", "ok": False,
         "reason": "not an image, or a format Pillow cannot read"}]
    assert "nothing was enrolled" in reply.body["error"]


def test_enrol_for_real_then_status_counts_without_names(real_faces, astronaut_png, tmp_path):
    routes = real_faces
    assert status(routes).body == {"registry_exists": False, "enrolled": 0, "problem": None}
    photo = astronaut_png.read_bytes()
    reply = enroll(routes, form(name="Eileen Collins-Example"),
                   [("astronaut.png", photo), ("grey.png", GREY)])
    assert reply.status == 200, reply.body
    body = reply.body
    assert body["ok"] and body["id"].startswith("id_") and body["scope"] == "any"
    assert [(p["source"], p["ok"]) for p in body["photos"]] == [("astronaut.png", True),
                                                                 ("grey.png", False)]
    assert "opencv" in body["backends"]
    assert PASS not in json.dumps(body)

    st = status(routes).body
    assert st == {"registry_exists": True, "enrolled": 1, "problem": None}
    assert "Eileen" not in json.dumps(st)

    # photos are not kept: the home holds the registry and its key file only
    names = {p.name for p in (tmp_path / "home").iterdir()}
    assert names <= {"identities.db", "identities.db-wal", "identities.db-shm", "registry.key",
                     "expected.json"}
    record = json.loads((tmp_path / "home" / "expected.json").read_text())
    assert set(record) == {"version", "registry"}  # paths and a time, nothing of the photos
    assert record["registry"]["path"] == str(tmp_path / "home" / "identities.db")

    # the same name again is refused; a second person needs the passphrase once only now
    again = enroll(routes, form(name="Eileen Collins-Example", passphrase_confirm=None),
                   [("astronaut.png", photo)])
    assert again.status == 400 and "already enrolled" in again.body["error"]

    # the nodes' engine picks up the new registry: the photo is refused as an input
    bridge = sys.modules[routes.__name__.rsplit(".", 1)[0] + ".comfy_bridge"]
    rgb = np.asarray(Image.open(astronaut_png).convert("RGB"))
    [verdict] = bridge.get_engine().check_input_images([rgb])
    assert not verdict.allowed and verdict.reasons[0].label == body["id"]


# -- passphrase limits: atomic, per client, global (issue 12 item 14) --------------------------

class JsonRequest:
    """What the admin routes use of an aiohttp request: json() and the peer's address."""

    def __init__(self, body, remote="192.0.2.7"):
        self.body, self.remote = body, remote

    async def json(self):
        return self.body


@pytest.fixture
def admin_api(routes, comfy, monkeypatch, tmp_path):
    """The admin routes with a counted admin.verify and the admin passphrase set."""
    adm = sys.modules[comfy.__name__ + ".consent_guard.admin"]
    home = tmp_path / "home"
    adm.set_passphrase(home, PASS)
    real, calls = adm.verify, []

    def counted(where, passphrase):
        calls.append(passphrase)
        return real(where, passphrase)
    monkeypatch.setattr(adm, "verify", counted)
    import importlib

    api = importlib.import_module(comfy.__name__ + ".nodes.admin_routes")
    api.test_calls, api.test_admin, api.test_home = calls, adm, home
    return api


def audit(api, passphrase, remote="192.0.2.7"):
    body = {} if passphrase is None else {"passphrase": passphrase}
    return asyncio.run(api.handle_audit(JsonRequest(body, remote)))


def test_forty_concurrent_wrong_passphrases_get_five_checks(admin_api, routes):
    """40 wrong passphrases at once from one client through the real handler (each check on
    the loop's thread pool): the limit is reserved before the slow scrypt, so 5 are checked."""
    async def storm():
        return await asyncio.gather(*(admin_api.handle_audit(
            JsonRequest({"passphrase": f"wrong guess {i:02d}"})) for i in range(40)))
    replies = asyncio.run(storm())
    codes = sorted(r.status for r in replies)
    assert len(admin_api.test_calls) == 5, len(admin_api.test_calls)
    assert codes.count(403) == 5 and codes.count(429) == 35


def test_a_locked_out_client_does_not_lock_out_the_admin(admin_api, routes):
    for i in range(5):
        assert audit(admin_api, f"wrong guess {i}", remote="203.0.113.9").status == 403
    assert audit(admin_api, PASS, remote="203.0.113.9").status == 429  # that client waits
    assert audit(admin_api, PASS, remote="192.0.2.1").status == 200  # the admin does not
    routes.test_clock.now += 61
    assert audit(admin_api, "wrong again", remote="203.0.113.9").status == 403


def test_requests_without_a_passphrase_are_not_counted(admin_api, routes):
    admin_api.test_admin.set_locked(admin_api.test_home, True, PASS)
    admin_api.test_calls.clear()
    for _ in range(30):
        assert audit(admin_api, None).status == 403
        post = JsonRequest({"text": "enforce = false\n"})
        reply = asyncio.run(admin_api.handle_policy_post(post))
        assert reply.status == 403 and reply.body["locked"]
    assert admin_api.test_calls == []  # nothing was checked, nothing counted
    assert audit(admin_api, PASS).status == 200


def test_the_global_limit_slows_many_addresses_but_never_locks_out(admin_api, routes):
    limiter = routes.LIMITER
    for i in range(limiter.global_failures):  # one wrong guess each from many addresses
        assert audit(admin_api, "wrong guess", remote=f"198.51.100.{i}").status == 403
    first = audit(admin_api, "wrong guess", remote="198.51.100.200")
    assert first.status == 403  # still checked, but the next one anyone sends must wait
    reply = audit(admin_api, PASS, remote="192.0.2.1")
    assert reply.status == 429 and reply.body["retry_after"] == limiter.global_spacing
    routes.test_clock.now += limiter.global_spacing
    assert audit(admin_api, PASS, remote="192.0.2.1").status == 200  # after one spacing
    checked = len(admin_api.test_calls)
    for i in range(10):  # a burst while over the global cap: one check per spacing
        audit(admin_api, "wrong guess", remote=f"198.51.100.{100 + i}")
    assert len(admin_api.test_calls) == checked  # the admin's try took this slot
    for i in range(3):  # the admin's address, right once, is not kept waiting by the flood
        assert audit(admin_api, PASS, remote="192.0.2.1").status == 200
        assert audit(admin_api, "wrong guess", remote=f"198.51.100.{120 + i}").status == 429
    routes.test_clock.now += limiter.window + 1  # the window clears: full speed again
    for i in range(3):
        assert audit(admin_api, "wrong guess", remote=f"198.51.100.{150 + i}").status == 403


def test_enrol_and_admin_routes_count_in_one_limiter_per_client(admin_api, routes, tmp_path):
    make_registry(tmp_path)
    bad = form(passphrase="guess number z", passphrase_confirm=None)
    for _ in range(3):
        assert enroll(routes, bad, [("a.png", GREY)]).status == 403  # FakeRequest's address
    for i in range(2):
        assert audit(admin_api, f"wrong {i}").status == 403  # the same address
    assert audit(admin_api, PASS).status == 429
    assert enroll(routes, bad, [("a.png", GREY)]).status == 429
    assert audit(admin_api, PASS, remote="192.0.2.99").status == 200


def test_a_request_that_checks_no_passphrase_cannot_reset_the_count(routes, tmp_path):
    """Four wrong guesses, then an enrolment whose photos are all unreadable (no passphrase is
    checked when the lock is off): the count stands, the fifth wrong guess locks out."""
    make_registry(tmp_path)
    bad = form(passphrase="guess number w", passphrase_confirm=None)
    for _ in range(4):
        assert enroll(routes, bad, [("a.png", GREY)]).status == 403
    reply = enroll(routes, form(passphrase_confirm=None), [("notes.txt", b"not a photo")])
    assert reply.status == 400 and "No photo could be read" in reply.body["error"]
    assert enroll(routes, bad, [("a.png", GREY)]).status == 403
    assert enroll(routes, bad, [("a.png", GREY)]).status == 429


# -- first-run set-up, lock, and the refusal codes (issue 13 item 2) ---------------------------

def setup_post(api, body, remote="127.0.0.1"):
    reply = asyncio.run(api.handle_setup_post(JsonRequest(body, remote)))
    json.dumps(reply.body)
    return reply


@pytest.fixture
def fresh_api(routes, comfy):
    """The admin routes on a home with nothing set up."""
    import importlib

    return importlib.import_module(comfy.__name__ + ".nodes.admin_routes")


SETUP = {"passphrase": PASS, "passphrase_confirm": PASS, "enforce": True, "locked": True}


def test_setup_route_then_refused_once_done(fresh_api, tmp_path):
    home = tmp_path / "home"
    before = asyncio.run(fresh_api.handle_setup_get(JsonRequest({}))).body
    assert before["set_up"] is False and before["registry_exists"] is False
    reply = setup_post(fresh_api, SETUP)
    assert reply.status == 200 and reply.body["registry"] == "created", reply.body
    assert PASS not in json.dumps(reply.body)
    assert (home / "admin.json").exists() and (home / "identities.db").exists()
    assert asyncio.run(fresh_api.handle_setup_get(JsonRequest({}))).body["set_up"] is True
    again = setup_post(fresh_api, dict(SETUP, passphrase="x" * 12, passphrase_confirm="x" * 12))
    assert again.status == 409 and again.body["code"] == "already_set_up"
    status_body = asyncio.run(fresh_api.handle_status(JsonRequest({}))).body
    assert status_body["set_up"] and status_body["locked"]
    assert status_body["setup"]["registry"]["exists"] is True
    assert {m["name"] for m in status_body["models"]} >= {"nudenet_320n", "open_nsfw"}


@pytest.mark.parametrize("body, code", [
    (dict(SETUP, passphrase_confirm="different one!"), "passphrase_mismatch"),
    (dict(SETUP, passphrase="", passphrase_confirm=""), "passphrase_missing"),
    (dict(SETUP, enforce="yes"), "bad_request")])
def test_setup_route_refusals_have_codes(fresh_api, tmp_path, body, code):
    reply = setup_post(fresh_api, body)
    assert reply.status == 400 and reply.body["code"] == code, reply.body
    assert not (tmp_path / "home" / "admin.json").exists()


def test_setup_wrong_registry_passphrase_counts_as_a_guess(fresh_api, routes, tmp_path):
    make_registry(tmp_path)  # sealed with PASS
    other = "the new admin passphrase"
    body = dict(SETUP, passphrase=other, passphrase_confirm=other)
    reply = setup_post(fresh_api, body)
    assert reply.status == 400 and reply.body["code"] == "registry_passphrase_needed"
    for _ in range(5):
        reply = setup_post(fresh_api, dict(body, registry_passphrase="a wrong guess"))
        assert reply.status == 403 and reply.body["code"] == "registry_passphrase_wrong"
    assert setup_post(fresh_api, dict(body, registry_passphrase=PASS)).status == 429
    routes.test_clock.now += 61
    reply = setup_post(fresh_api, dict(body, registry_passphrase=PASS))
    assert reply.status == 200 and reply.body["registry"] == "resealed", reply.body
    # enrolment now needs only the admin passphrase: it opens the registry too
    from consent_guard.registry import Registry
    Registry.open(tmp_path / "home" / "identities.db", passphrase=other).close()


def test_missing_and_wrong_passphrases_get_different_codes_and_messages(admin_api):
    admin_api.test_admin.set_locked(admin_api.test_home, True, PASS)
    missing = asyncio.run(admin_api.handle_policy_post(JsonRequest({"text": "enforce = true\n"})))
    wrong = asyncio.run(admin_api.handle_policy_post(JsonRequest(
        {"text": "enforce = true\n", "passphrase": "not it at all"})))
    assert missing.status == wrong.status == 403
    assert missing.body["code"] == "passphrase_missing" and "Type it" in missing.body["error"]
    assert wrong.body["code"] == "passphrase_wrong" and "Wrong admin passphrase" in \
        wrong.body["error"]
    assert missing.body["locked"] and wrong.body["locked"]
    assert audit(admin_api, None).body["code"] == "passphrase_missing"
    assert audit(admin_api, "wrong guess").body["code"] == "passphrase_wrong"


def test_enrol_missing_passphrase_code(routes):
    reply = enroll(routes, form(passphrase=None), [("a.png", GREY)])
    assert reply.status == 400 and reply.body["code"] == "passphrase_missing"


def test_lock_and_unlock_need_the_admin_passphrase(admin_api):
    home, adm = admin_api.test_home, admin_api.test_admin

    def lock(body):
        return asyncio.run(admin_api.handle_lock(JsonRequest(body)))
    assert lock({"locked": True}).body["code"] == "passphrase_missing"
    assert lock({"locked": True, "passphrase": "wrong one!"}).body["code"] == "passphrase_wrong"
    assert not adm.is_locked(home)
    assert lock({"locked": True, "passphrase": PASS}).body == {"ok": True, "locked": True}
    assert adm.is_locked(home)
    assert lock({"locked": False, "passphrase": "wrong one!"}).status == 403
    assert adm.is_locked(home)
    assert lock({"locked": False, "passphrase": PASS}).status == 200
    assert not adm.is_locked(home)
    assert lock({"locked": "no", "passphrase": PASS}).status == 400


def test_lock_before_setup_says_to_set_up(fresh_api):
    reply = asyncio.run(fresh_api.handle_lock(JsonRequest({"locked": True, "passphrase": PASS})))
    assert reply.status == 403 and reply.body["code"] == "not_set_up"


def test_after_setup_a_new_registry_needs_the_admin_passphrase(admin_api, routes, tmp_path):
    """Admin passphrase set (no registry): enrolment with another passphrase is refused as a
    wrong admin passphrase instead of sealing a new registry with it."""
    reply = enroll(routes, form(passphrase="some other passphrase",
                                passphrase_confirm="some other passphrase"), [("a.png", GREY)])
    assert reply.status == 403 and reply.body["code"] == "passphrase_wrong"
    assert not (tmp_path / "home" / "identities.db").exists()


def test_registry_sealed_with_another_passphrase_is_named(admin_api, routes, tmp_path,
                                                          monkeypatch):
    """The admin passphrase is right but the registry has its own: the reply says to type the
    registry's, and with it the registry opens (enrol_person gets the registry passphrase)."""
    from consent_guard.registry import Registry
    home = tmp_path / "home"
    Registry.create(home / "identities.db", "registry's own passphrase").close()
    seen = []

    def fake_enrol(policy, where, passphrase, **kw):
        seen.append(passphrase)
        try:  # the real check; raised again as the LockedError of the package under test
            Registry.open(home / "identities.db", passphrase=passphrase).close()
        except Exception as exc:
            raise routes.admin_api.LockedError(str(exc)) from None
        raise RuntimeError("stop here")
    monkeypatch.setattr(routes.admin_api, "enrol_person", fake_enrol)
    monkeypatch.setattr(routes.admin_api, "decode_photo",
                        lambda data, max_pixels: np.zeros((8, 8, 3)))
    reply = enroll(routes, form(passphrase_confirm=None), [("a.png", GREY)])
    assert reply.status == 403 and reply.body["code"] == "registry_passphrase_needed"
    reply = enroll(routes, form(passphrase_confirm=None,
                                registry_passphrase="registry's own passphrase"),
                   [("a.png", GREY)])
    assert seen[-1] == "registry's own passphrase"
    assert reply.status == 500 and "stop here" in reply.body["error"]


def test_setup_only_from_this_machine(fresh_api, tmp_path):
    """Until set-up is done the first passphrase sent makes its sender the admin: a ComfyUI
    started with --listen must not hand that to anyone on the network."""
    reply = setup_post(fresh_api, SETUP, remote="192.168.1.23")
    assert reply.status == 403 and reply.body["code"] == "setup_local_only"
    assert "consent-guard setup" in reply.body["error"]
    assert asyncio.run(fresh_api.handle_setup_get(JsonRequest({}))).body["set_up"] is False
    assert setup_post(fresh_api, SETUP, remote="::1").status == 200


@pytest.mark.parametrize("client, local", [("127.0.0.1", True), ("127.8.9.1", True),
                                           ("::1", True), ("::ffff:127.0.0.1", True),
                                           ("10.0.0.5", False), ("::ffff:10.0.0.5", False),
                                           ("unknown", False), ("", False)])
def test_is_loopback(fresh_api, client, local):
    assert fresh_api.is_loopback(client) is local
