"""Against the real ComfyUI: skipped unless COMFYUI_DIR points at a checkout.

Setup (once): a venv for ComfyUI with its requirements (COMFYUI_DIR/venv, or set
COMFYUI_PYTHON), then `<that python> install.py` from this repo. The test starts ComfyUI on
CPU with a throwaway --base-directory whose custom_nodes/ links to this repo, drives it over
HTTP (POST /prompt, GET /history) and checks what lands in output/ and temp/.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Comfy:
    """`wait_for`: the node whose /object_info shows that the plugin loaded, or None to wait
    only for the server (a plugin that is meant not to load)."""

    def __init__(self, base: Path, home: Path, wait_for: str = "ConsentGuardSaveImage",
                 extra_args=()):
        comfy_dir = Path(COMFYUI_DIR)
        python = os.environ.get("COMFYUI_PYTHON") or str(comfy_dir / "venv" / "bin" / "python")
        if not Path(python).exists():
            python = sys.executable
        self.base, self.port = base, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, CONSENT_GUARD_HOME=str(home))
        self.log = open(base / "server.log", "w")
        self.proc = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(base), *extra_args],
            cwd=comfy_dir, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {self.tail()}")
            try:
                if wait_for is None:
                    self.get("/system_stats")
                    return
                info = self.get(f"/object_info/{wait_for}")
                if info:
                    return
                raise RuntimeError("ComfyUI started without Consent Guard's nodes (did "
                                   f"`{python} install.py` run?): {self.tail()}")
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not start in time: {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return (self.base / "server.log").read_text()[-3000:]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def run(self, graph: dict, timeout: float = 180) -> dict:
        req = urllib.request.Request(self.url + "/prompt", method="POST",
                                     data=json.dumps({"prompt": graph, "client_id": "cg-test"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            prompt_id = json.loads(r.read())["prompt_id"]
        return wait_done(self, prompt_id, timeout)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    server, base, home = start(tmp_path_factory)
    yield server, base, home
    server.stop()


def start(tmp_path_factory, policy: str = "", custom_nodes: dict = None):
    """A ComfyUI on a throwaway base directory whose custom_nodes/consent_guard is this repo,
    with t1.jpg in input/ and `policy` in a fresh Consent Guard home. `custom_nodes`: {folder
    name: its __init__.py source}, test-only nodes put beside it."""
    from conftest import package_file

    base = tmp_path_factory.mktemp("comfy_base")
    home = tmp_path_factory.mktemp("cg_home")
    if policy:
        (home / "policy.toml").write_text(policy)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "consent_guard").symlink_to(REPO, target_is_directory=True)
    for name, source in (custom_nodes or {}).items():
        (base / "custom_nodes" / name).mkdir()
        (base / "custom_nodes" / name / "__init__.py").write_text(source)
    (base / "input").mkdir()
    shutil.copy(package_file("insightface", "data/images/t1.jpg"), base / "input" / "t1.jpg")
    return Comfy(base, home), base, home


def save_graph(prefix: str) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": "t1.jpg"}},
            "2": {"class_type": "ConsentGuardSaveImage",
                  "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def check_then_save_graph(prefix: str) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": "t1.jpg"}},
            "2": {"class_type": "ConsentGuardCheckImage", "inputs": {"images": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}}


def outputs(base: Path, prefix: str):
    return sorted((base / "output").glob(f"{prefix}_*.png"))


def original(base: Path) -> np.ndarray:
    return np.asarray(Image.open(base / "input" / "t1.jpg").convert("RGB"))


def set_policy(home: Path, text: str):
    (home / "policy.toml").write_text(text)
    time.sleep(0.05)


def test_1_allowed_image_is_saved_with_verdict_metadata(comfy):
    server, base, home = comfy
    hist = server.run(save_graph("cg_save"))
    assert hist["status"]["status_str"] == "success", hist["status"]
    [saved] = outputs(base, "cg_save")
    img = Image.open(saved)
    assert json.loads(img.text["consent_guard"])["decision"] == "allow"
    assert "prompt" in img.text
    assert np.array_equal(np.asarray(img.convert("RGB")), original(base))


def test_2_check_node_then_stock_save(comfy):
    server, base, home = comfy
    hist = server.run(check_then_save_graph("cg_check"))
    assert hist["status"]["status_str"] == "success", hist["status"]
    [saved] = outputs(base, "cg_check")
    assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), original(base))
    report = hist["outputs"].get("2")  # CheckImage is not an output node: report is its STRING
    assert report is None or "images" not in report


def test_3_blocked_image_never_reaches_output(comfy):
    """A policy that calls everything explicit (both open_nsfw bands at 0) makes the real
    models block a benign photo: the real block path, end to end, with nothing explicit."""
    server, base, home = comfy
    set_policy(home, "[explicit]\nopen_nsfw_safe_below = 0.0\nopen_nsfw_explicit_at = 0.0\n")
    hist = server.run(save_graph("cg_blocked"))
    assert hist["status"]["status_str"] == "success", hist["status"]
    assert outputs(base, "cg_blocked") == []
    ui = hist["outputs"]["2"]
    assert [i["type"] for i in ui["images"]] == ["temp"]
    assert "block" in ui["consent_guard"][0]
    placeholder = base / "temp" / ui["images"][0]["filename"]
    assert not np.array_equal(np.asarray(Image.open(placeholder).convert("RGB")), original(base))

    # the same Check -> SaveImage graph as test 2 must be re-checked, not served from cache
    hist = server.run(check_then_save_graph("cg_check_blocked"))
    assert hist["status"]["status_str"] == "success", hist["status"]
    [saved] = outputs(base, "cg_check_blocked")
    assert not np.array_equal(np.asarray(Image.open(saved).convert("RGB")), original(base))


def test_4_missing_model_fails_closed_with_message(comfy):
    server, base, home = comfy
    set_policy(home, f'[models.paths]\nnudenet_320n = "{base / "nowhere.onnx"}"\n')
    hist = server.run(save_graph("cg_fail"))
    assert hist["status"]["status_str"] == "error"
    messages = json.dumps(hist["status"]["messages"])
    assert "nowhere.onnx" in messages
    assert outputs(base, "cg_fail") == []
    hist = server.run(check_then_save_graph("cg_fail_check"))
    assert hist["status"]["status_str"] == "error" and outputs(base, "cg_fail_check") == []


def post_form(server: Comfy, path: str, fields: dict, photos=()):
    """POST multipart/form-data as a browser's FormData does: (status, JSON body, headers)."""
    boundary = "----consentguardtest" + os.urandom(8).hex()
    body = b""
    for key, value in fields.items():
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'
                 f'{value}\r\n').encode()
    for filename, data in photos:
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; '
                 f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n').encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(server.url + path, data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def test_5_enrol_dialog_routes_then_input_check_refuses(comfy, astronaut_png):
    """The front end's extension file is served (and its imports resolve), the status and
    enrol routes answer, and a person enrolled through them (scope any) is refused as a
    LoadImage source by ConsentGuardCheckInput."""
    server, base, home = comfy
    set_policy(home, "")  # test 4 left a policy with a missing model
    js_path = "/extensions/consent_guard/js/consent_guard.js"
    assert js_path in server.get("/extensions")  # the list the front end loads
    with urllib.request.urlopen(server.url + js_path, timeout=10) as r:
        js = r.read().decode()
    assert "ConsentGuard.Enrol" in js
    for module in re.findall(r'from "(\.[^"]+)"', js):
        url = urllib.parse.urljoin(server.url + js_path, module)
        with urllib.request.urlopen(url, timeout=10) as r:  # ../../../scripts/app.js etc.
            assert "window.comfyAPI" in r.read().decode(), url

    for prefix in ("", "/api"):  # api.fetchApi adds /api
        assert server.get(prefix + "/consent_guard/identities/status") == {
            "registry_exists": False, "enrolled": 0, "problem": None}

    passphrase = "integration test passphrase"
    photo = astronaut_png.read_bytes()
    fields = {"passphrase": passphrase, "passphrase_confirm": passphrase,
              "name": "Astronaut Example", "aliases": "AE", "scope": "any",
              "consent_by": "Astronaut Example", "consent_date": "2024-05-01", "note": "test"}
    status, body, _ = post_form(server, "/api/consent_guard/identities/enroll", fields,
                                [("astronaut.png", photo)])
    assert status == 200, body
    assert body["ok"] and body["id"].startswith("id_") and body["photos"][0]["ok"]
    enrolled_id = body["id"]
    assert passphrase not in json.dumps(body)

    wrong = dict(fields, passphrase="not the passphrase at all", name="Someone Else")
    del wrong["passphrase_confirm"]
    status, body, _ = post_form(server, "/consent_guard/identities/enroll", wrong,
                                [("astronaut.png", photo)])
    assert status == 403 and "not the passphrase" not in json.dumps(body), body

    st = server.get("/consent_guard/identities/status")
    assert st == {"registry_exists": True, "enrolled": 1, "problem": None}

    shutil.copy(astronaut_png, base / "input" / "astronaut.png")
    hist = server.run({
        "1": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
        "2": {"class_type": "ConsentGuardCheckInput", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}})
    assert hist["status"]["status_str"] == "error"
    messages = json.dumps(hist["status"]["messages"])
    assert "Consent Guard refuses input image 1 of 1" in messages
    assert "protected person" in messages
    # neither the name nor the registry id: the audit log keeps the id for the admin
    assert enrolled_id not in messages and "Astronaut Example" not in messages

    # four more wrong passphrases: the fifth within a minute locks enrolment for a minute
    for _ in range(4):
        status, _, _ = post_form(server, "/consent_guard/identities/enroll", wrong,
                                 [("astronaut.png", photo)])
        assert status == 403
    status, body, headers = post_form(server, "/consent_guard/identities/enroll", fields,
                                      [("astronaut.png", photo)])
    assert status == 429 and int(headers["Retry-After"]) > 0, body


def post_prompt(server: Comfy, graph: dict):
    """POST /prompt as the front end's api.queuePrompt does: (status, JSON body)."""
    data = json.dumps({"prompt": graph, "client_id": "cg-test"}).encode()
    req = urllib.request.Request(server.url + "/prompt", method="POST", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def txt2img_graph(positive: str, negative: str, ckpt: str) -> dict:
    """ComfyUI's default workflow in API format."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 1, "steps": 1, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                           "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "cg_txt2img",
                                                    "images": ["8", 0]}},
    }


def wait_done(server: Comfy, prompt_id: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = server.get(f"/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            return hist[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish: {server.tail()}")


def test_6_blocked_prompt_is_refused_before_queueing(comfy):
    """The on-prompt handler: a blocked positive is answered 400 the way ComfyUI answers a
    prompt that fails validation, naming the node, and nothing is queued; the same words only
    in the negative pass the handler (the empty checkpoint then fails at run time)."""
    server, base, home = comfy
    set_policy(home, "")
    ckpt_dir = base / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "cg_empty.safetensors").write_bytes(b"")  # listed, so validation passes
    history_before = server.get("/history")

    status, body = post_prompt(server, txt2img_graph("a nude woman", "blurry",
                                                     "cg_empty.safetensors"))
    assert status == 400, body
    assert body["error"]["type"] == "consent_guard_refused", body
    assert body["error"]["message"] == "Consent Guard refused this prompt", body
    details = body["error"]["details"]
    assert details.startswith("This prompt asks for sexual content"), body
    assert "nude" not in json.dumps(body)  # the text itself is never echoed
    assert list(body["node_errors"]) == ["6"], body  # the front end outlines node 6
    assert body["node_errors"]["6"]["class_type"] == "CLIPTextEncode"
    assert body["node_errors"]["6"]["errors"][0]["details"] == "input 'text'"
    queue = server.get("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == [], queue
    assert server.get("/history") == history_before

    status, body = post_prompt(server, txt2img_graph("a quiet harbour at dawn", "a nude woman",
                                                     "cg_empty.safetensors"))
    assert status == 200 and body["node_errors"] == {}, body
    hist = wait_done(server, body["prompt_id"])
    assert "Consent Guard" not in json.dumps(hist["status"]), hist["status"]


def test_7_check_prompt_node_passes_allowed_text(comfy):
    server, base, home = comfy
    hist = server.run({
        "1": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a quiet harbour"}},
        "2": {"class_type": "ConsentGuardCheckPrompt", "inputs": {"text": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}})
    assert hist["status"]["status_str"] == "success", hist["status"]
    assert hist["outputs"]["3"]["text"] == ["a quiet harbour"]
