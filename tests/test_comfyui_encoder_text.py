"""Text checked when an encoder receives it (nodes/sources.py, comfy/sd.py CLIP.tokenize),
against the real ComfyUI: skipped unless COMFYUI_DIR points at a checkout (setup as in
test_comfyui_integration.py).

No text-encoder weights can be had offline, so the encoder here is a small test-only custom
node that calls ComfyUI's own `comfy.sd.CLIP.tokenize` with a stand-in tokenizer, as every
stock encoder calls it with a loaded CLIP. The text comes from the stock Replace node
(comfy_extras/nodes_string.py StringReplace), so it exists only at run time: each string the
submission holds ("a nQde woman", "Q", "u") is allowed on its own."""
from __future__ import annotations

import json

import pytest

from test_comfyui_integration import COMFYUI_DIR, post_prompt, start, wait_done

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")

ENCODER = '''
import types
import comfy.sd


class CGTestEncode:
    """Hands its text to comfy.sd.CLIP.tokenize, as CLIPTextEncode does with a real CLIP."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "encode"
    OUTPUT_NODE = True

    def encode(self, text):
        clip = types.SimpleNamespace(tokenizer_options={}, tokenizer=types.SimpleNamespace(
            tokenize_with_weights=lambda text, word_ids=False, **kw: {"l": [[(1, 1.0)]]}))
        comfy.sd.CLIP.tokenize(clip, text)
        return {"ui": {"text": [f"{len(text)} characters encoded"]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"CGTestEncode": CGTestEncode}
'''


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    server, base, home = start(tmp_path_factory, "enforce = true\n",
                               custom_nodes={"cg_test_encoder": ENCODER})
    yield server, home
    server.stop()


def graph(find: str, replace: str) -> dict:
    return {"1": {"class_type": "StringReplace", "inputs": {
                "string": "a nQde woman", "find": find, "replace": replace}},
            "2": {"class_type": "CGTestEncode", "inputs": {"text": ["1", 0]}}}


def run(server, g):
    status, body = post_prompt(server, g)
    assert status == 200, body  # every string of the submission is allowed on its own
    return wait_done(server, body["prompt_id"])


def test_text_built_at_run_time_is_refused_at_the_encoder(comfy):
    server, home = comfy
    hist = run(server, graph("Q", "u"))
    assert hist["status"]["status_str"] == "error", hist["status"]
    messages = json.dumps(hist["status"]["messages"])
    assert "refuses the text that node 2 (CGTestEncode) encodes" in messages, messages
    records = [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]
    assert any(r["kind"] == "prompt" and r["decision"] == "block" for r in records)


def test_allowed_text_is_encoded(comfy):
    server, home = comfy
    hist = run(server, graph("nQde", "quiet"))
    assert hist["status"]["status_str"] == "success", hist["status"]
    assert "characters encoded" in json.dumps(hist["outputs"]["2"])


def test_text_an_api_node_would_send_is_checked_when_it_runs(comfy):
    """comfy_api_nodes send their prompt to another service without a CLIP tokenizer: the
    text built at run time is refused before the node runs (without an account it would
    fail with "Unauthorized" otherwise, and with one the prompt would be sent)."""
    server, home = comfy
    hist = run(server, {
        "1": {"class_type": "StringReplace", "inputs": {
            "string": "a nQde woman", "find": "Q", "replace": "u"}},
        "2": {"class_type": "OpenAIDalle3", "inputs": {
            "prompt": ["1", 0], "seed": 1, "quality": "standard", "style": "natural",
            "size": "1024x1024"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}})
    messages = json.dumps(hist["status"]["messages"])
    assert hist["status"]["status_str"] == "error", hist["status"]
    assert "refuses the text that node 2 (OpenAIDalle3) sends" in messages, messages
