"""Refusals as the real ComfyUI reports them: skipped unless COMFYUI_DIR points at a checkout
(setup as in test_comfyui_integration.py).

What the front end (web/js/refusals.js) and an API client get, over the websocket /ws and from
GET /history: a refused input stops the run as `execution_interrupted` (no `execution_error`,
which opens the crash report, and no traceback in the log) with the custom event
"consent_guard.refusal" carrying the plain message; a refused prompt is answered 400 in the
shape the 1.27 front end reads; a picture a save node blocks sends the event and the run goes
on. Nothing refused is saved. No explicit picture is used: the policy calls every picture
explicit (open_nsfw thresholds at 0).
"""
from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
import urllib.request
from pathlib import Path

import pytest

from test_comfyui_integration import (COMFYUI_DIR, post_prompt, start, txt2img_graph,
                                      wait_done)

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")
EVENT = "consent_guard.refusal"
CONTACT = "Talk to your teacher."
EVERYTHING_EXPLICIT = "[explicit]\nopen_nsfw_safe_below = 0.0\nopen_nsfw_explicit_at = 0.0\n"
MESSAGES = f'[messages]\ncontact = "{CONTACT}"\n'
ENFORCED = "enforce = true\n" + MESSAGES + EVERYTHING_EXPLICIT


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    server, base, home = start(tmp_path_factory, ENFORCED)
    yield server, base, home
    server.stop()


class Socket:
    """A minimal websocket client for ComfyUI's /ws (RFC 6455: the handshake, then unmasked
    frames from the server; text frames are JSON {"type", "data"}, binary ones previews)."""

    def __init__(self, url: str, client_id: str):
        host, port = url.split("//")[1].split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.buffer = b""

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the websocket closed")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def message(self):
        """The next text message as JSON (binary frames skipped)."""
        while True:
            b0, b1 = self._read(2)
            length = b1 & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(length)
            if b0 & 0x0F == 1:
                return json.loads(payload)

    def until_done(self, prompt_id: str, timeout: float = 180) -> list:
        """Every message until the run ends (success, error or interruption)."""
        seen, deadline = [], time.time() + timeout
        self.sock.settimeout(timeout)
        while time.time() < deadline:
            msg = self.message()
            seen.append(msg)
            data = msg.get("data") or {}
            if msg.get("type") in ("execution_success", "execution_error",
                                   "execution_interrupted") and \
                    data.get("prompt_id") == prompt_id:
                # the refusal event follows the interruption: read what is left
                self.sock.settimeout(2)
                try:
                    while True:
                        seen.append(self.message())
                except (socket.timeout, TimeoutError):
                    return seen
        raise TimeoutError(f"no end of {prompt_id}: {seen}")

    def close(self):
        self.sock.close()


def queue(server, graph: dict, client_id: str) -> str:
    req = urllib.request.Request(server.url + "/prompt", method="POST",
                                 data=json.dumps({"prompt": graph, "client_id": client_id})
                                 .encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["prompt_id"]


def files(folder: Path):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def set_policy(home: Path, text: str):
    (home / "policy.toml").write_text(text)
    time.sleep(0.05)


def log_since(server, offset: int) -> str:
    server.log.flush()
    return (server.base / "server.log").read_text()[offset:]


def test_1_refused_input_is_an_interruption_with_the_message(comfy):
    server, base, home = comfy
    set_policy(home, ENFORCED)
    offset = len((base / "server.log").read_text())
    ws = Socket(server.url, "cg-refusals")
    try:
        graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "t1.jpg"}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                             "filename_prefix": "cg_refused"}}}
        prompt_id = queue(server, graph, "cg-refusals")
        seen = ws.until_done(prompt_id)
    finally:
        ws.close()
    types = [m["type"] for m in seen]
    assert "execution_error" not in types, seen  # the front end's crash report
    assert "execution_interrupted" in types, seen
    [event] = [m["data"] for m in seen if m["type"] == EVENT]
    assert event["kind"] == "input_explicit" and event["stopped"] is True, event
    assert event["node"] == "1" and event["node_type"] == "LoadImage", event
    assert event["message"] == "This picture has sexual content, so it cannot be used here."
    assert event["next"] == "Use a different picture." and event["contact"] == CONTACT
    assert set(event["texts"]) == {"en", "id", "ko"}
    # an API client without a websocket learns it from the history
    hist = wait_done(server, prompt_id)
    assert hist["status"]["status_str"] == "error", hist["status"]
    kept = dict((name, data) for name, data in hist["status"]["messages"])
    assert "execution_interrupted" in kept and "execution_error" not in kept
    assert kept[EVENT]["message"] == event["message"] and kept[EVENT]["contact"] == CONTACT
    log = log_since(server, offset)
    assert "Traceback" not in log and "Exception during processing" not in log, log
    assert "Consent Guard: run stopped at node 1 (LoadImage): input_explicit" in log, log
    assert files(base / "output") == [] and files(base / "temp") == []


def test_2_refused_prompt_is_one_message_under_the_real_node(comfy):
    server, base, home = comfy
    set_policy(home, ENFORCED)
    ckpt = base / "models" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "cg_empty.safetensors").write_bytes(b"")
    status, body = post_prompt(server, txt2img_graph("a nude woman", "blurry",
                                                     "cg_empty.safetensors"))
    assert status == 400, body
    error, node_errors = body["error"], body["node_errors"]
    assert error["type"] == "consent_guard_refused"
    assert error["message"] == "Consent Guard refused this prompt"
    assert error["details"] == ("This prompt asks for sexual content, which is not allowed "
                                f"here. Change the prompt and run it again. {CONTACT}")
    assert list(node_errors) == ["6"], body
    assert node_errors["6"]["class_type"] == "CLIPTextEncode"  # a node type that exists
    assert node_errors["6"]["errors"] == [{"type": "consent_guard_refused",
                                           "message": "Refused by Consent Guard",
                                           "details": "input 'text'",
                                           "extra_info": {"input_name": "text"}}]
    # what the 1.27 front end's PromptExecutionError.toString() would show, were the toast
    # not put in its place: every part once, no raw codes, no prompt text
    shown = error["message"] + ": " + error["details"] + "".join(
        "\n" + n["class_type"] + ":" + "".join("\n    - " + e["message"] + ": " + e["details"]
                                             for e in n["errors"])
        for n in node_errors.values())
    assert shown.count("sexual content") == 1 and shown.count(CONTACT) == 1, shown
    assert "sexual_explicit" not in json.dumps(body) and "nude" not in json.dumps(body)
    assert error["extra_info"]["consent_guard"]["kind"] == "prompt_explicit"
    assert server.get("/queue") == {"queue_running": [], "queue_pending": []}


def test_3_a_blocked_picture_in_the_save_node_sends_a_toast(comfy):
    """Without enforce mode Consent Guard: Save Image blocks the picture, shows the placeholder
    and tells the browser; the run itself succeeds."""
    server, base, home = comfy
    set_policy(home, MESSAGES + EVERYTHING_EXPLICIT)
    ws = Socket(server.url, "cg-refusals-save")
    try:
        graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "t1.jpg"}},
                 "2": {"class_type": "ConsentGuardSaveImage",
                       "inputs": {"images": ["1", 0], "filename_prefix": "cg_blocked"}}}
        prompt_id = queue(server, graph, "cg-refusals-save")
        seen = ws.until_done(prompt_id)
    finally:
        ws.close()
        set_policy(home, ENFORCED)
    types = [m["type"] for m in seen]
    assert "execution_success" in types and "execution_error" not in types, seen
    [event] = [m["data"] for m in seen if m["type"] == EVENT]
    assert event["kind"] == "output_explicit" and event["stopped"] is False, event
    assert event["blocked"] == 1 and event["total"] == 1 and event["node"] == "2", event
    assert event["contact"] == CONTACT
    assert not list((base / "output").glob("cg_blocked*")), files(base / "output")
    [shown] = [m["data"]["output"]["images"] for m in seen
               if m["type"] == "executed" and m["data"]["node"] == "2"]
    assert shown[0]["type"] == "temp" and shown[0]["filename"].startswith("ConsentGuard_blocked")
