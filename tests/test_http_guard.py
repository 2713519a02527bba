"""Enforce mode over HTTP (nodes/http_guard.py): uploads and /view, against stand-ins.

The middleware is called as aiohttp calls a new-style middleware, `await guard(request,
handler)`, with stand-in requests that carry what it reads (method, path, the matched route's
canonical path, query, form, body) and a stand-in aiohttp.web for the responses. The protected
person is a test double at the detector interface (conftest.FakeFaces) enrolled in a real
registry under scope `any`; no picture of anyone real is used. The real ComfyUI:
test_comfyui_uploads.py."""
from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import comfy_standins
from conftest import FakeFaces, FakeParts, FakeScorer, fake_backend, keyed_image
from consent_guard import Engine, Policy
from consent_guard.registry import Consent, Registry

PKG = "custom_nodes_consent_guard_under_test"
PASS = "correct horse battery"
ALICE, NOBODY, EXPLICIT = 30, 33, 20  # image keys (top-left red value)
PEOPLE = {ALICE: ["alice"], NOBODY: []}
SIZE = (120, 64)


# -- stand-ins ------------------------------------------------------------------------------------

class Response:
    def __init__(self, status=200, body=None, reason=None, headers=None):
        self.status, self.body, self.reason, self.headers = status, body, reason, headers or {}


class FileResponse(Response):
    """aiohttp.web.FileResponse keeps the file it will send in `_path`."""

    def __init__(self, path, status=200):
        super().__init__(status)
        self._path = Path(path)


def aiohttp_standin():
    aiohttp, web = types.ModuleType("aiohttp"), types.ModuleType("aiohttp.web")
    web.json_response = lambda body, status=200, reason=None, headers=None: \
        Response(status, body, reason, headers)
    web.FileResponse = FileResponse
    aiohttp.web = web
    return aiohttp, web


class Field:
    """aiohttp's FileField: filename and an open file."""

    def __init__(self, filename, data: bytes):
        self.filename, self.file = filename, io.BytesIO(data)


class Request:
    """What the middleware reads of an aiohttp web.Request. `route`: the matched route's
    canonical path (default: the path)."""

    def __init__(self, method, path, query=None, form=None, body=b"", route=None, file=None):
        self.method, self.path = method, path
        self.rel_url = types.SimpleNamespace(query=dict(query or {}))
        resource = types.SimpleNamespace(canonical=route or path)
        info = {"file": file} if file else {}
        self.match_info = types.SimpleNamespace(route=types.SimpleNamespace(resource=resource),
                                                get=info.get)
        self._form, self._body = form or {}, body

    async def post(self):
        return self._form

    async def read(self):
        return self._body


class Handler:
    """The route's own handler: records that it ran, and what it read of the upload."""

    def __init__(self, response=None):
        self.calls, self.read = 0, None
        self.response = response or Response(200, {"name": "ok"})

    async def __call__(self, request):
        self.calls += 1
        image = request._form.get("image")
        if image is not None and hasattr(image, "file"):
            self.read = image.file.read()
        return self.response


def png(key=NOBODY, alpha=None, size=SIZE) -> bytes:
    """A keyed picture (conftest.keyed_image) as PNG; `alpha`: a key whose picture becomes
    the alpha channel (as grayscale), or an int array."""
    rgb = keyed_image(key, size)
    if alpha is None:
        img = Image.fromarray(rgb)
    else:
        a = keyed_image(alpha, size)[:, :, 0] if isinstance(alpha, int) else alpha
        img = Image.fromarray(np.dstack([rgb, a]).astype(np.uint8), "RGBA")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def call(guard, request, handler):
    return asyncio.run(guard(request, handler))


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture
def registry(tmp_path):
    reg = Registry.create(tmp_path / "identities.db", PASS)
    reg.add("Alice Example", "any", Consent("Alice Example"),
            {"fake-000000000001": FakeFaces.vector("alice")[None]})
    yield reg
    reg.close()


@pytest.fixture
def comfy(monkeypatch, tmp_path, registry):
    """The package loaded as ComfyUI loads it, folder_paths with what server.py's routes use
    (get_input_directory, get_directory_by_type, annotated_filepath as in folder_paths.py),
    an engine in enforce mode with the fake detectors, and the http_guard module."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    base = tmp_path / "comfy"
    pkg = comfy_standins.install(monkeypatch, base, server=comfy_standins.make_server(),
                                 core=True)
    aiohttp, web = aiohttp_standin()
    monkeypatch.setitem(sys.modules, "aiohttp", aiohttp)
    monkeypatch.setitem(sys.modules, "aiohttp.web", web)
    fp = sys.modules["folder_paths"]
    dirs = {"input": str(base / "input"), "output": fp.output_directory,
            "temp": fp.temp_directory}
    monkeypatch.setattr(fp, "get_input_directory", lambda: dirs["input"], raising=False)
    monkeypatch.setattr(fp, "get_directory_by_type", dirs.get, raising=False)

    def annotated_filepath(name):
        for kind in ("output", "input", "temp"):
            if name.endswith(f"[{kind}]"):
                return name[:-len(kind) - 3], dirs[kind]
        return name, None

    monkeypatch.setattr(fp, "annotated_filepath", annotated_filepath, raising=False)
    import importlib
    guard_mod = importlib.import_module(PKG + ".nodes.http_guard")
    guard_mod.CACHE.clear()
    env = types.SimpleNamespace(pkg=pkg, base=base, home=home, mod=guard_mod,
                                guard=guard_mod.guard, engine=None, checked=[])
    use_engine(monkeypatch, env, registry)
    yield env
    for key in [k for k in sys.modules if k.startswith(PKG)]:
        del sys.modules[key]


def use_engine(monkeypatch, env, registry, enforce=True, faces=None, **policy):
    """An engine whose explicit check blocks key EXPLICIT and whose face stage sees Alice
    (scope any) in key ALICE; every checked picture's key and thread are noted."""
    engine = Engine(Policy(enforce=enforce, **policy), parts=FakeParts(),
                    scorer=FakeScorer(whole={EXPLICIT: 0.97}), registry=registry,
                    face_backend=faces or fake_backend(PEOPLE))
    for name in ("check_images", "check_input_images"):
        original = getattr(engine, name)

        def noting(pixels, *a, _original=original, _name=name):
            env.checked += [(_name, int(np.asarray(p).reshape(-1)[0]),
                             threading.current_thread().name) for p in pixels]
            return _original(pixels, *a)
        monkeypatch.setattr(engine, name, noting)
    monkeypatch.setattr(sys.modules[PKG + ".nodes.image_nodes"], "get_engine", lambda: engine)
    env.engine = engine
    return engine


def upload(env, data, filename="photo.png", mask=False, api=False, **fields):
    path = ("/api" if api else "") + ("/upload/mask" if mask else "/upload/image")
    form = {"image": Field(filename, data), **fields}
    handler = Handler()
    reply = call(env.guard, Request("POST", path, form=form), handler)
    return reply, handler


def view(env, filename, handler=None, **query):
    handler = handler or Handler(FileResponse(Path(env.base) / query.get("type", "output")
                                              / filename))
    reply = call(env.guard, Request("GET", "/view", query={"filename": filename, **query}),
                 handler)
    return reply, handler


def put(env, folder, name, data: bytes) -> Path:
    path = env.base / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- installing -----------------------------------------------------------------------------------

def test_install_appends_one_middleware_marked_new_style(comfy):
    app = types.SimpleNamespace(middlewares=["cache_control", "origin_only"], frozen=False)
    server = types.SimpleNamespace(app=app)
    comfy.mod.install(server)
    comfy.mod.install(server)  # idempotent: the package may be imported twice
    assert app.middlewares == ["cache_control", "origin_only", comfy.guard]
    assert comfy.guard.__middleware_version__ == 1  # else aiohttp calls it old style


def test_install_refuses_a_started_server_or_one_without_an_app(comfy):
    with pytest.raises(RuntimeError, match="already started"):
        comfy.mod.install(types.SimpleNamespace(app=types.SimpleNamespace(middlewares=[],
                                                                          frozen=True)))
    with pytest.raises(RuntimeError, match="no aiohttp application"):
        comfy.mod.install(types.SimpleNamespace())


# -- uploads --------------------------------------------------------------------------------------

def test_other_routes_and_enforce_off_pass_untouched(comfy, monkeypatch, registry):
    handler = Handler()
    call(comfy.guard, Request("POST", "/prompt", form={"type": "output"}), handler)
    assert handler.calls == 1 and comfy.checked == []
    use_engine(monkeypatch, comfy, registry, enforce=False)
    reply, handler = upload(comfy, png(ALICE), type="output")
    assert handler.calls == 1 and reply.status == 200 and comfy.checked == []


@pytest.mark.parametrize("kind", ["output", "temp", "models"])
def test_uploads_outside_input_are_refused(comfy, kind):
    reply, handler = upload(comfy, png(NOBODY), type=kind)
    assert reply.status == 403 and handler.calls == 0
    assert "only into the input folder" in reply.body["error"]
    assert reply.reason == reply.body["error"]  # the front end shows statusText


@pytest.mark.parametrize("api", [False, True])
def test_allowed_upload_reaches_the_handler_whole(comfy, api):
    data = png(NOBODY)
    reply, handler = upload(comfy, data, api=api, type="input")
    assert reply.status == 200 and handler.calls == 1
    assert handler.read == data  # the file was rewound for the handler
    assert [c[0] for c in comfy.checked] == ["check_input_images"]
    assert comfy.checked[0][2].startswith("consent-guard-http")  # off the event loop


@pytest.mark.parametrize("api", [False, True])
def test_upload_of_a_protected_person_is_refused_without_naming_them(comfy, api, registry):
    reply, handler = upload(comfy, png(ALICE), api=api)
    assert reply.status == 403 and handler.calls == 0
    message = json.dumps(reply.body) + reply.reason
    assert "did not pass the check" in message
    assert "Alice" not in message and registry.identities()[0].id not in message


def test_a_protected_person_hidden_in_the_alpha_channel_is_refused(comfy):
    """LoadImage turns the alpha into a MASK and /view?channel=a shows it as a picture."""
    reply, handler = upload(comfy, png(NOBODY, alpha=ALICE))
    assert reply.status == 403 and handler.calls == 0
    assert ("check_input_images", ALICE) in [c[:2] for c in comfy.checked]
    flat = np.full(SIZE[::-1], 255, np.uint8)  # a flat alpha shows nothing: not checked
    reply, handler = upload(comfy, png(NOBODY, alpha=flat))
    assert reply.status == 200 and handler.calls == 1


def test_every_frame_of_an_animation_is_checked(comfy):
    frames = [Image.fromarray(keyed_image(k, SIZE)) for k in (NOBODY, NOBODY, ALICE)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])  # APNG, lossless
    reply, handler = upload(comfy, buf.getvalue(), filename="anim.png")
    assert reply.status == 403 and handler.calls == 0


def test_an_animation_over_the_pixel_budget_is_refused_before_decoding(comfy, monkeypatch,
                                                                        registry):
    use_engine(monkeypatch, comfy, registry, max_pixels=SIZE[0] * SIZE[1] * 2)
    frames = [Image.fromarray(keyed_image(NOBODY + i, SIZE)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    reply, handler = upload(comfy, buf.getvalue(), filename="anim.gif")
    assert reply.status == 400 and handler.calls == 0
    assert "too large to check: 3 frame(s)" in reply.body["error"] and comfy.checked == []


@pytest.mark.parametrize("name,data", [("clip.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\0" * 64),
                                       ("notes.png", b"just some text"),
                                       ("song.flac", b"fLaC" + b"\0" * 64)])
def test_uploads_that_are_not_images_are_refused(comfy, name, data):
    reply, handler = upload(comfy, data, filename=name)
    assert reply.status == 403 and handler.calls == 0
    assert f"{name} is not an image" in reply.body["error"]


def test_a_check_that_cannot_run_refuses(comfy, monkeypatch, registry):
    broken = fake_backend(PEOPLE, error=RuntimeError("detector exploded"))
    use_engine(monkeypatch, comfy, registry, faces=broken)
    reply, handler = upload(comfy, png(NOBODY))
    assert reply.status == 403 and handler.calls == 0
    assert "could not check" in reply.body["error"] and "detector exploded" in \
        reply.body["error"]


def test_an_audit_log_that_cannot_be_written_refuses(comfy):
    comfy.engine.audit = types.SimpleNamespace(record=lambda *a, **k: False,
                                               append=lambda *a, **k: None,  # AuditLog's
                                               last_error="disk full")
    reply, handler = upload(comfy, png(NOBODY))
    assert reply.status == 403 and handler.calls == 0 and "disk full" in reply.body["error"]


def test_an_unreadable_policy_refuses(comfy, monkeypatch):
    def no_engine():
        raise sys.modules[PKG + ".nodes.comfy_bridge"].ConsentGuardError("policy is broken")
    monkeypatch.setattr(sys.modules[PKG + ".nodes.image_nodes"], "get_engine", no_engine)
    monkeypatch.setattr(sys.modules[PKG + ".nodes.comfy_bridge"], "policy_state",
                        lambda: ("policy.toml", 1, 1))  # the file exists: enforce counts as on
    reply, handler = upload(comfy, png(NOBODY))
    assert reply.status in (400, 403) and handler.calls == 0
    assert "policy is broken" in reply.body["error"]


# -- mask uploads ---------------------------------------------------------------------------------

def mask_ref(name="photo.png", kind="input", subfolder=""):
    return json.dumps({"filename": name, "type": kind, "subfolder": subfolder})


def test_mask_upload_checks_the_picture_it_would_write(comfy):
    put(comfy, "input", "photo.png", png(NOBODY))
    reply, handler = upload(comfy, png(NOBODY, alpha=NOBODY + 1), mask=True, type="input",
                            original_ref=mask_ref())
    assert reply.status == 200 and handler.calls == 1
    # a mask whose alpha shows the protected person
    reply, handler = upload(comfy, png(NOBODY, alpha=ALICE), mask=True,
                            original_ref=mask_ref())
    assert reply.status == 403 and handler.calls == 0
    # an original that shows them (in output, where enforce mode's savers would not have put it)
    put(comfy, "output", "alice.png", png(ALICE))
    reply, handler = upload(comfy, png(NOBODY, alpha=NOBODY + 1), mask=True,
                            original_ref=mask_ref("alice.png", "output"))
    assert reply.status == 403 and handler.calls == 0


@pytest.mark.parametrize("ref,why", [
    (mask_ref("missing.png"), "was not found"),
    (mask_ref("../photo.png"), "names no usable file"),
    (mask_ref("photo.png", subfolder="../../"), "leaves the folder"),
    ("not json", "not the JSON"),
    (None, "not the JSON")])
def test_mask_upload_with_an_unusable_original_is_refused(comfy, ref, why):
    put(comfy, "input", "photo.png", png(NOBODY))
    fields = {"original_ref": ref} if ref is not None else {}
    reply, handler = upload(comfy, png(NOBODY, alpha=NOBODY + 1), mask=True, **fields)
    assert reply.status == 400 and handler.calls == 0 and why in reply.body["error"]


def test_mask_upload_into_output_is_refused(comfy):
    put(comfy, "input", "photo.png", png(NOBODY))
    reply, handler = upload(comfy, png(NOBODY, alpha=NOBODY + 1), mask=True, type="output",
                            original_ref=mask_ref())
    assert reply.status == 403 and handler.calls == 0


# -- /view ----------------------------------------------------------------------------------------

def test_view_serves_a_checked_file_and_checks_it_once(comfy):
    put(comfy, "output", "ok.png", png(NOBODY))
    for _ in range(2):
        reply, handler = view(comfy, "ok.png", type="output")
        assert handler.calls == 1 and reply is handler.response
    assert [c[:2] for c in comfy.checked] == [("check_images", NOBODY)]  # cached


def test_view_refuses_a_protected_person_and_an_explicit_image(comfy):
    put(comfy, "input", "alice.png", png(ALICE))
    put(comfy, "temp", "x.png", png(EXPLICIT))
    for name, kind in (("alice.png", "input"), ("x.png", "temp"), ("alice.png [input]", None)):
        query = {"type": kind} if kind else {}
        reply, handler = view(comfy, name, handler=Handler(FileResponse("/nowhere")), **query)
        assert reply.status == 403 and handler.calls == 0, name
        assert "did not pass the check" in reply.body["error"]


def test_view_of_a_file_changed_since_its_check_checks_again(comfy):
    path = put(comfy, "output", "f.png", png(NOBODY))
    assert view(comfy, "f.png")[0].status == 200
    path.write_bytes(png(ALICE))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    reply, handler = view(comfy, "f.png")
    assert reply.status == 403 and handler.calls == 0


def test_view_checks_the_alpha_channel(comfy):
    put(comfy, "output", "a.png", png(NOBODY, alpha=ALICE))
    reply, handler = view(comfy, "a.png", channel="a")
    assert reply.status == 403 and handler.calls == 0


def test_view_in_a_subfolder_and_through_api(comfy):
    put(comfy, "output", "sub/alice.png", png(ALICE))
    handler = Handler(FileResponse(comfy.base / "output" / "sub" / "alice.png"))
    reply = call(comfy.guard, Request("GET", "/api/view", route="/api/view", query={
        "filename": "alice.png", "subfolder": "sub", "type": "output"}), handler)
    assert reply.status == 403 and handler.calls == 0


@pytest.mark.parametrize("name,data,served", [
    ("clip.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\0" * 64, False),
    ("clip.webm", b"\x1a\x45\xdf\xa3" + b"\0" * 64, False),
    ("model.glb", b"glTF" + b"\0" * 64, False),
    ("workflow.json", b'{"a": 1}', False),
    ("fake.flac", b"not audio at all", False),
    ("song.flac", b"fLaC" + bytes([0x80, 0, 0, 34]) + b"\0" * 34 + b"\xff\xf8" * 64, True),
    ("cover.flac", b"fLaC" + bytes([0x06, 0, 0, 8]) + b"\0" * 8 + bytes([0x80, 0, 0, 0]), False),
    ("song.mp3", b"ID3\x03\x00\x00\x00\x00\x00\x10" + b"\0" * 64, True),
    ("art.mp3", b"ID3\x03\x00\x00\x00\x00\x00\x10APIC" + b"\0" * 64, False),
    ("hidden.wav", b"RIFF\0\0\0\0WAVEdata" + b"\x89PNG\r\n\x1a\n" + b"\0" * 64, False)])
def test_view_of_files_that_are_not_images(comfy, name, data, served):
    put(comfy, "output", name, data)
    reply, handler = view(comfy, name)
    assert (handler.calls == 1) is served, name
    if not served:
        assert reply.status == 403
        assert "serves only images it has checked and plain audio" in reply.body["error"]
        assert ("a video" in reply.body["error"]) is name.startswith("clip")


def test_view_that_serves_a_file_it_did_not_check_is_refused(comfy):
    """If view_image ever finds another file than view_file() does, or answers 200 for a
    query view_file() thinks serves nothing, nothing unchecked goes out."""
    put(comfy, "output", "ok.png", png(NOBODY))
    other = put(comfy, "output", "other.png", png(ALICE))
    reply, handler = view(comfy, "ok.png", handler=Handler(FileResponse(other)))
    assert handler.calls == 1 and reply.status == 403
    reply, handler = view(comfy, "missing.png", handler=Handler(Response(200, b"bytes")))
    assert handler.calls == 1 and reply.status == 403
    reply, handler = view(comfy, "missing.png", handler=Handler(Response(404)))
    assert reply.status == 404  # the handler's own answer


def test_a_file_response_that_does_not_say_its_file_is_refused(comfy):
    class FileResponse(Response):  # an aiohttp whose FileResponse keeps no `_path`
        pass
    user = comfy.base / "user" / "default"
    user.mkdir(parents=True, exist_ok=True)
    (user / "w.json").write_bytes(b"{}")
    reply, handler = userdata(comfy, "GET", "w.json", handler=Handler(FileResponse()))
    assert handler.calls == 1 and reply.status == 403


def test_view_refuses_while_the_policy_cannot_be_read(comfy, monkeypatch):
    put(comfy, "output", "ok.png", png(NOBODY))

    def no_engine():
        raise sys.modules[PKG + ".nodes.comfy_bridge"].ConsentGuardError("policy is broken")
    monkeypatch.setattr(sys.modules[PKG + ".nodes.image_nodes"], "get_engine", no_engine)
    monkeypatch.setattr(sys.modules[PKG + ".nodes.comfy_bridge"], "policy_state",
                        lambda: ("policy.toml", 1, 1))
    reply, handler = view(comfy, "ok.png")
    assert reply.status == 403 and handler.calls == 0 and "policy is broken" in \
        reply.body["error"]


# -- /userdata ------------------------------------------------------------------------------------

def userdata(env, method, name, body=b"", handler=None):
    handler = handler or Handler()
    reply = call(env.guard, Request(method, f"/userdata/{name}", route="/userdata/{file}",
                                    body=body, file=name), handler)
    return reply, handler


def test_userdata_takes_workflows_but_no_pictures(comfy):
    reply, handler = userdata(comfy, "POST", "workflows%2Fa.json", b'{"nodes": []}')
    assert handler.calls == 1
    svg = (b'<svg xmlns="http://www.w3.org/2000/svg"><image href="data:image/png;base64,'
           b'iVBORw0KGgo="/></svg>')
    for name, body in (("x.json", png(NOBODY)), ("clip.mp4", b"\0" * 32), ("a.svg", svg),
                       ("notes.txt", b"  " + svg), ("page.html", b"<p>hi</p>")):
        reply, handler = userdata(comfy, "POST", name, body)
        assert reply.status == 403 and handler.calls == 0, name


def test_userdata_serves_pictures_only_after_a_check(comfy):
    user = comfy.base / "user" / "default"
    user.mkdir(parents=True, exist_ok=True)
    (user / "alice.png").write_bytes(png(ALICE))
    (user / "ok.png").write_bytes(png(NOBODY))
    (user / "w.json").write_bytes(b"{}")
    (user / "a.svg").write_bytes(b'<svg xmlns="http://www.w3.org/2000/svg"></svg>')
    for name, status in (("alice.png", 403), ("ok.png", 200), ("w.json", 200),
                         ("a.svg", 403)):
        handler = Handler(FileResponse(user / name))
        reply, handler = userdata(comfy, "GET", name, handler=handler)
        assert handler.calls == 1 and reply.status == status, name
