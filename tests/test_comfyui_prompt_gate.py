"""The prompt gate (nodes/prompt_guard.py on_prompt) against the real ComfyUI, over HTTP:
issue 12 items 4a (wrapped values), 4d (negatives at cfg <= 1), 9 (a 3000-node submission
does not hold the server) and 15 (the README's policy_override example is queued). Skipped
unless COMFYUI_DIR is set (see tests/test_comfyui_integration.py)."""
from __future__ import annotations

import json
import threading
import time

import pytest

from test_comfyui_integration import COMFYUI_DIR, post_prompt, start, txt2img_graph

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")

BAD = "a nude woman"  # the words tests/test_comfyui_integration.py uses
CKPT = "cg_empty.safetensors"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    server, base, home = start(tmp_path_factory)
    ckpt_dir = base / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / CKPT).write_bytes(b"")  # listed, so validation passes; the run then fails
    yield server, base, home
    server.stop()


def refused(body) -> list:
    """The nodes Consent Guard refused in a 400 answer, or [] when it did not refuse."""
    details = json.dumps(body.get("error", {}))
    return sorted(body.get("node_errors", {})) if "Consent Guard" in details else []


def test_1_wrapped_text_is_refused(comfy):
    server, base, home = comfy
    for value in ({"__value__": BAD}, {"__value__": ["a portrait", {"style": BAD}]}):
        graph = txt2img_graph("x", "blurry", CKPT)
        graph["6"]["inputs"]["text"] = value
        status, body = post_prompt(server, graph)
        assert status == 400 and refused(body) == ["6"], body
        assert body["error"]["details"].startswith("This prompt asks for sexual content"), body
        assert body["node_errors"]["6"]["errors"][0]["details"] == "input 'text'", body
        assert "nude" not in json.dumps(body)


@pytest.mark.parametrize("cfg,blocked", [(0.0, True), (1.0, True), (8.0, False)])
def test_2_negative_counts_only_above_cfg_1(comfy, cfg, blocked):
    server, base, home = comfy
    graph = txt2img_graph("a quiet harbour at dawn", BAD, CKPT)
    graph["3"]["inputs"]["cfg"] = cfg
    status, body = post_prompt(server, graph)
    if blocked:
        assert status == 400 and refused(body) == ["7"], body
    else:
        assert status == 200 and body["node_errors"] == {}, body


def test_3_readme_policy_override_is_queued(comfy):
    server, base, home = comfy
    graph = txt2img_graph("a quiet harbour at dawn", "blurry", CKPT)
    graph["9"] = {"class_type": "ConsentGuardSaveImage", "inputs": {
        "images": ["8", 0], "filename_prefix": "cg_override",
        "policy_override": '[actions] nudity = "block"'}}
    status, body = post_prompt(server, graph)
    assert status == 200 and body["node_errors"] == {}, body
    graph["6"]["inputs"]["text"] = '[actions] nudity = "block"'  # as a prompt: refused
    status, body = post_prompt(server, graph)
    assert status == 400 and refused(body) == ["6"], body


def primitives(n: int, distinct: bool) -> dict:
    graph = txt2img_graph("a quiet harbour at dawn", "blurry", CKPT)
    for i in range(n):
        text = f"a harbour at dawn, boat {i if distinct else 0}"
        graph[str(1000 + i)] = {"class_type": "PrimitiveStringMultiline",
                                "inputs": {"value": text}}
    return graph


def test_4_three_thousand_texts_do_not_hold_the_server(comfy):
    """Item 9: 3000 distinct texts are refused at once (over the bound); 3000 copies of one
    text are checked once and queued; GET /system_stats answers meanwhile."""
    server, base, home = comfy
    stats_waits = []

    def poll():
        while not done.is_set():
            start = time.perf_counter()
            server.get("/system_stats")
            stats_waits.append(time.perf_counter() - start)
            time.sleep(0.05)

    done = threading.Event()
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        took = {}
        for distinct in (True, False):
            start = time.perf_counter()
            status, body = post_prompt(server, primitives(3000, distinct))
            took[distinct] = time.perf_counter() - start
            if distinct:
                # refused whole: no node of the graph is to blame, so none is outlined
                assert status == 400 and body["node_errors"] == {}, body
                assert body["error"]["message"] == "Consent Guard could not check this prompt"
                assert "at most" in body["error"]["details"], body
            else:
                assert status == 200 and body["node_errors"] == {}, body
    finally:
        done.set()
        poller.join()
    print(f"\nPOST /prompt, 3000 primitives: distinct {took[True]:.2f} s, one text "
          f"{took[False]:.2f} s; longest GET /system_stats {max(stats_waits):.2f} s")
    assert took[True] < 10 and took[False] < 10 and max(stats_waits) < 10
