"""Uploads and /view in enforce mode against the real ComfyUI (nodes/http_guard.py): skipped
unless COMFYUI_DIR points at a checkout (setup as in test_comfyui_integration.py).

A benign adult (skimage's astronaut) is enrolled under scope `any` through the enrol route;
t1.jpg (insightface's group photo of other adults) is the allowed picture. The routes are
ComfyUI a125cd84's server.py upload_image, upload_mask, view_image and app/user_manager.py's
/userdata/{file}, each also under /api.

The middleware is put in by enforce.install() while ComfyUI imports this package.
"""
from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from test_comfyui_integration import COMFYUI_DIR, Comfy, post_form

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")
HOOK_NAME = "PromptServer.app middleware (uploads, /view)"  # nodes/http_guard.py HOOK_NAME
PASS = "uploads integration passphrase"



@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from conftest import package_file

    base = tmp_path_factory.mktemp("comfy_base")
    home = tmp_path_factory.mktemp("cg_home")
    (home / "policy.toml").write_text("enforce = true\n")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "consent_guard").symlink_to(REPO, target_is_directory=True)
    (base / "input").mkdir()
    server = Comfy(base, home)
    try:
        hooks = server.get("/api/consent_guard/status")["hooks"]
        assert hooks.get(HOOK_NAME) == "installed", hooks
        t1 = package_file("insightface", "data/images/t1.jpg")
        astronaut = package_file("skimage", "data/astronaut.png")
        enrol(server, astronaut)
        yield server, base, home, t1.read_bytes(), astronaut.read_bytes()
    finally:
        server.stop()


def enrol(server, astronaut: Path) -> None:
    fields = {"passphrase": PASS, "passphrase_confirm": PASS, "name": "Astronaut Example",
              "scope": "any", "consent_by": "Astronaut Example", "consent_date": "2024-05-01"}
    status, body, _ = post_form(server, "/api/consent_guard/identities/enroll", fields,
                                [("astronaut.png", astronaut.read_bytes())])
    assert status == 200 and body["ok"], body


def upload(server, data: bytes, filename: str, path="/upload/image", **fields):
    """POST multipart/form-data as the front end's upload does: (status, reason, body)."""
    boundary = "----cgupload" + os.urandom(8).hex()
    body = b""
    for key, value in fields.items():
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'
                 f'{value}\r\n').encode()
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
             f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
             ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(server.url + path, data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    return send(req)


def send(req):
    try:
        with urllib.request.urlopen(req, timeout=180) as r:
            return r.status, r.reason, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.reason, err.read()


def view(server, path="/view", **query):
    return send(urllib.request.Request(server.url + path + "?" + urllib.parse.urlencode(query)))


def error_of(body: bytes) -> str:
    return json.loads(body)["error"]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_1_allowed_upload_is_written_and_served(comfy):
    server, base, home, t1, astronaut = comfy
    status, _, body = upload(server, t1, "cg_t1.jpg", type="input")
    assert status == 200, body
    assert json.loads(body)["name"] == "cg_t1.jpg"
    assert (base / "input" / "cg_t1.jpg").read_bytes() == t1
    for path in ("/view", "/api/view"):
        status, _, served = view(server, path, filename="cg_t1.jpg", type="input")
        assert status == 200 and served == t1
    status, _, preview = view(server, filename="cg_t1.jpg", type="input", preview="webp;50")
    assert status == 200 and preview[:4] == b"RIFF"


@pytest.mark.parametrize("path", ["/upload/image", "/api/upload/image"])
def test_2_photo_of_a_protected_person_is_refused_without_the_name(comfy, path):
    server, base, home, t1, astronaut = comfy
    status, reason, body = upload(server, astronaut, "cg_astro.png", path=path)
    assert status == 403, body
    assert "did not pass the check" in error_of(body) and "did not pass" in reason
    assert "Astronaut" not in body.decode() + reason
    assert not (base / "input" / "cg_astro.png").exists()
    records = [json.loads(line) for line in (home / "audit.log").read_text().splitlines()
               if line.startswith("{")]
    assert any(r["kind"] == "input_image" and r["decision"] == "block"
               and "POST /upload/image cg_astro.png" in (r.get("note") or "")
               for r in records)  # the admin sees why


@pytest.mark.parametrize("kind", ["output", "temp"])
def test_3_uploads_into_output_or_temp_are_refused(comfy, kind):
    server, base, home, t1, astronaut = comfy
    status, _, body = upload(server, t1, f"cg_{kind}.jpg", type=kind)
    assert status == 403 and "only into the input folder" in error_of(body)
    assert not list((base / kind).glob("cg_*"))


def test_4_files_put_there_some_other_way_are_checked_before_view(comfy):
    """The admin copied them in, so they were never checked: /view checks them itself."""
    server, base, home, t1, astronaut = comfy
    (base / "output").mkdir(exist_ok=True)
    (base / "output" / "cg_astro_copy.png").write_bytes(astronaut)
    for path in ("/view", "/api/view"):
        for extra in ({}, {"channel": "rgb"}, {"preview": "jpeg;90"}):
            status, _, body = view(server, path, filename="cg_astro_copy.png", type="output",
                                   **extra)
            assert status == 403 and "Astronaut" not in body.decode(), (path, extra)
    status, _, _ = view(server, filename="cg_astro_copy.png [output]")
    assert status == 403
    (base / "output" / "cg_clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\0" * 64)
    status, _, body = view(server, filename="cg_clip.mp4", type="output")
    assert status == 403 and "a video" in error_of(body)
    (base / "output" / "cg_song.flac").write_bytes(b"fLaC" + bytes([0x80, 0, 0, 34])
                                                  + b"\0" * 34 + b"\xff\xf8" * 64)
    status, _, _ = view(server, filename="cg_song.flac", type="output")
    assert status == 200


def test_5_mask_upload_is_checked_as_the_picture_it_writes(comfy):
    server, base, home, t1, astronaut = comfy
    t1_size = Image.open(io.BytesIO(t1)).size
    mask = png_bytes(Image.new("RGBA", t1_size, (0, 0, 0, 128)))
    ref = {"filename": "cg_t1.jpg", "type": "input", "subfolder": ""}
    status, _, body = upload(server, mask, "cg_mask.png", path="/upload/mask", type="input",
                             original_ref=json.dumps(ref))
    assert status == 200, body
    written = Image.open(base / "input" / "cg_mask.png")
    assert written.mode == "RGBA" and written.getchannel("A").getextrema() == (128, 128)

    # the original shows the protected person (copied in by hand: never checked)
    (base / "input" / "cg_astro_orig.png").write_bytes(astronaut)
    size = Image.open(io.BytesIO(astronaut)).size
    mask = png_bytes(Image.new("RGBA", size, (0, 0, 0, 200)))
    ref = {"filename": "cg_astro_orig.png", "type": "input", "subfolder": ""}
    status, _, body = upload(server, mask, "cg_mask2.png", path="/api/upload/mask",
                             original_ref=json.dumps(ref))
    assert status == 403, body
    assert not (base / "input" / "cg_mask2.png").exists()
    status, _, body = upload(server, mask, "cg_mask3.png", path="/upload/mask", type="output",
                             original_ref=json.dumps(ref))
    assert status == 403 and "only into the input folder" in error_of(body)


def test_6_a_protected_face_in_the_alpha_channel_is_refused(comfy):
    """The alpha becomes LoadImage's MASK and /view?channel=a shows it: it is checked as a
    grayscale picture."""
    server, base, home, t1, astronaut = comfy
    gray = Image.open(io.BytesIO(astronaut)).convert("L")
    cover = Image.new("RGB", gray.size, (90, 120, 150))
    cover.putalpha(gray)
    status, _, body = upload(server, png_bytes(cover), "cg_hidden.png", type="input")
    assert status == 403, body
    assert not (base / "input" / "cg_hidden.png").exists()


def test_7_non_images_are_not_uploaded(comfy):
    server, base, home, t1, astronaut = comfy
    for name, data in (("cg_clip.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\0" * 64),
                       ("cg_text.png", b"plain text, not a picture")):
        status, _, body = upload(server, data, name)
        assert status == 403 and "is not an image" in error_of(body), name
        assert not (base / "input" / name).exists()


def test_8_userdata_keeps_workflows_but_no_pictures(comfy):
    server, base, home, t1, astronaut = comfy
    for path in ("/userdata/cg_astro.png", "/api/userdata/cg_astro.json"):
        req = urllib.request.Request(server.url + path, data=astronaut, method="POST")
        status, _, body = send(req)
        assert status == 403, (path, body)
    req = urllib.request.Request(server.url + "/userdata/cg_wf.json", data=b'{"nodes": []}',
                                 method="POST")
    assert send(req)[0] == 200
    user = base / "user" / "default"
    assert (user / "cg_wf.json").exists() and not list(user.glob("cg_astro*"))
    (user / "cg_planted.png").write_bytes(astronaut)  # put there by hand
    status, _, _ = send(urllib.request.Request(server.url + "/api/userdata/cg_planted.png"))
    assert status == 403
    # an SVG carries the photo as a data: URL that a browser shows (red team)
    import base64
    svg = (b'<svg xmlns="http://www.w3.org/2000/svg"><image href="data:image/png;base64,'
           + base64.b64encode(astronaut) + b'"/></svg>')
    for path in ("/userdata/cg_a.svg?overwrite=true", "/api/userdata/cg_notes.txt"):
        req = urllib.request.Request(server.url + path, data=svg, method="POST")
        assert send(req)[0] == 403, path
    (user / "cg_hand.svg").write_bytes(svg)
    status, _, _ = send(urllib.request.Request(server.url + "/api/userdata/cg_hand.svg"))
    assert status == 403


def test_9_enforce_off_leaves_uploads_alone(comfy):
    server, base, home, t1, astronaut = comfy
    (home / "policy.toml").write_text("enforce = false\n")
    time.sleep(0.05)
    try:
        status, _, body = upload(server, t1, "cg_off.jpg", type="temp")
        assert status == 200, body
        assert (base / "temp" / "cg_off.jpg").exists()
    finally:
        (home / "policy.toml").write_text("enforce = true\n")
        time.sleep(0.05)
    status, _, _ = view(server, filename="cg_astro_copy.png", type="output")
    assert status == 403  # on again: read on every request
