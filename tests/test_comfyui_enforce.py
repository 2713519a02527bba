"""Enforce mode against the real ComfyUI: skipped unless COMFYUI_DIR points at a checkout
(setup as in test_comfyui_integration.py). Stock nodes only: LoadImage -> SaveImage and
LoadImage -> PreviewImage, a stock text-to-image graph, the policy route, `doctor --url`, and
a ComfyUI whose copy of the plugin cannot be imported."""
from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_comfyui_integration import (COMFYUI_DIR, Comfy, post_prompt, start, txt2img_graph,
                                      wait_done)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")
PASS = "integration admin passphrase"
EVERYTHING_EXPLICIT = "[explicit]\nopen_nsfw_safe_below = 0.0\nopen_nsfw_explicit_at = 0.0\n"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    server, base, home = start(tmp_path_factory, "enforce = true\n")
    yield server, base, home
    server.stop()


def run(server, graph):
    status, body = post_prompt(server, graph)
    assert status == 200, body
    return wait_done(server, body["prompt_id"])


def files(folder: Path):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def post_json(server, path, body):
    req = urllib.request.Request(server.url + path, method="POST", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_1_armed_with_every_hook(comfy):
    server, base, home = comfy
    status = server.get("/api/consent_guard/status")
    assert status["enforce"] and status["armed"], status
    assert set(status["hooks"].values()) == {"installed"}, status["hooks"]


def test_2_stock_save_and_preview_of_a_blocked_image_write_nothing(comfy):
    server, base, home = comfy
    (home / "policy.toml").write_text("enforce = true\n" + EVERYTHING_EXPLICIT)
    time.sleep(0.05)
    for saver in ({"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                         "filename_prefix": "cg_enf"}},
                  {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}):
        hist = run(server, {"1": {"class_type": "LoadImage", "inputs": {"image": "t1.jpg"}},
                            "2": saver})
        assert hist["status"]["status_str"] == "error"
        # LoadImage is where the picture enters: refused there (nodes/sources.py)
        assert "refused the image made by LoadImage" in json.dumps(hist["status"]["messages"])
    assert files(base / "output") == [] and files(base / "temp") == []
    records = [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]
    assert [r["decision"] for r in records if r["kind"] == "image"] == ["block", "block"]


def test_3_allowed_image_is_saved_by_stock_nodes(comfy):
    server, base, home = comfy
    (home / "policy.toml").write_text("enforce = true\n")
    time.sleep(0.05)
    hist = run(server, {"1": {"class_type": "LoadImage", "inputs": {"image": "t1.jpg"}},
                        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                                    "filename_prefix": "cg_ok"}},
                        "3": {"class_type": "SaveAnimatedWEBP", "inputs": {
                            "images": ["1", 0], "filename_prefix": "cg_anim", "fps": 6.0,
                            "lossless": False, "quality": 80, "method": "default"}}})
    assert hist["status"]["status_str"] == "success", hist["status"]
    assert files(base / "output") == ["cg_anim_00001_.webp", "cg_ok_00001_.png"]


def test_4_explicit_prompt_refused_before_queueing(comfy):
    server, base, home = comfy
    ckpt = base / "models" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "cg_empty.safetensors").write_bytes(b"")
    status, body = post_prompt(server, txt2img_graph("a nude woman", "blurry",
                                                     "cg_empty.safetensors"))
    assert status == 400 and body["error"]["message"] == "Consent Guard refused this prompt"
    assert body["error"]["details"].startswith("This prompt asks for sexual content"), body
    queue = server.get("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []


def test_5_locked_policy_cannot_be_changed_over_http(comfy):
    server, base, home = comfy
    from consent_guard import admin

    admin.set_passphrase(home, PASS)
    admin.set_locked(home, True, PASS)
    before = (home / "policy.toml").read_text()
    for body in ({"text": "enforce = false\n"},
                 {"text": "enforce = false\n", "passphrase": "a wrong passphrase"}):
        status, reply = post_json(server, "/api/consent_guard/policy", body)
        assert status == 403 and reply["locked"], reply
    assert (home / "policy.toml").read_text() == before
    status, reply = post_json(server, "/api/consent_guard/policy",
                              {"text": before + "[actions]\nnudity = \"block\"\n",
                               "passphrase": PASS})
    assert status == 200, reply
    status, reply = post_json(server, "/api/consent_guard/audit", {"passphrase": "wrong one!"})
    assert status == 403
    status, reply = post_json(server, "/api/consent_guard/audit",
                              {"passphrase": PASS, "decision": "block"})
    assert status == 200 and reply["records"], reply


def test_6_doctor_against_the_running_comfyui(comfy):
    server, base, home = comfy
    from consent_guard import doctor

    checks = {c.name: c for c in doctor.run(home, base, url=server.url)}
    for name in ("plugin folder", "prestartup guard", "enforce mode", "admin lock",
                 "ComfyUI arguments", "plugin loaded", "hooks", "protection active"):
        assert checks[name].status == doctor.OK, checks[name]
    # tamper: the folder renamed .disabled (ComfyUI would skip it at the next start)
    link = base / "custom_nodes" / "consent_guard"
    link.rename(link.with_name("consent_guard.disabled"))
    try:
        checks = {c.name: c for c in doctor.run(home, base, url=server.url)}
        assert checks["plugin folder"].status == doctor.FAIL
    finally:
        link.with_name("consent_guard.disabled").rename(link)


def test_7_a_plugin_that_cannot_import_leaves_comfyui_refusing(tmp_path, comfy):
    """Enforce mode, and a copy of the plugin whose import fails (as a missing dependency
    would): the prestartup guard refuses every submission with the reason; doctor says the
    plugin is not loaded. Also: --disable-all-custom-nodes is reported by doctor."""
    server, base, home = comfy
    from consent_guard import doctor

    broken = tmp_path / "base"
    plugin = broken / "custom_nodes" / "consent_guard"
    plugin.mkdir(parents=True)
    (plugin / "prestartup_script.py").symlink_to(REPO / "prestartup_script.py")
    (plugin / "__init__.py").write_text('raise ImportError("simulated missing dependency")\n')
    (broken / "input").mkdir()
    shutil.copy(base / "input" / "t1.jpg", broken / "input" / "t1.jpg")
    other = Comfy(broken, home, wait_for=None)
    try:
        status, body = post_prompt(other, {
            "1": {"class_type": "LoadImage", "inputs": {"image": "t1.jpg"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                        "filename_prefix": "x"}}})
        assert status == 400 and body["error"]["type"] == "consent_guard_not_active", body
        # uploads and /view are refused too: the plugin's own guard of them is not there
        boundary = "cgbroken"
        data = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                f'filename="x.jpg"\r\n\r\n').encode() + \
            (base / "input" / "t1.jpg").read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        for path, kwargs in (("/upload/image", {"data": data, "method": "POST", "headers": {
                "Content-Type": f"multipart/form-data; boundary={boundary}"}}),
                ("/api/view?filename=t1.jpg&type=input", {})):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(other.url + path, **kwargs),
                                       timeout=30)
            assert err.value.code == 403, path
        assert sorted(p.name for p in (broken / "input").iterdir()) == ["t1.jpg"]
        checks = {c.name: c for c in doctor.run(home, broken, url=other.url)}
        assert checks["plugin loaded"].status == doctor.FAIL
    finally:
        other.stop()
    assert files(broken / "output") == []

    flagged = Comfy(base, home, wait_for=None, extra_args=["--disable-all-custom-nodes"])
    try:
        checks = {c.name: c for c in doctor.run(home, base, url=flagged.url)}
        assert checks["ComfyUI arguments"].status == doctor.FAIL, checks["ComfyUI arguments"]
        assert checks["plugin loaded"].status == doctor.FAIL
    finally:
        flagged.stop()
