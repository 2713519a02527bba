"""The reported enforce-mode bypasses, against the real ComfyUI (skipped unless COMFYUI_DIR
points at a checkout; setup as in test_comfyui_integration.py). A benign adult (skimage's
astronaut portrait) is enrolled under scope `any`; the probe is a cropped, rescaled copy
of that photo, not the enrolment file itself. Stock nodes only, plain HTTP."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_comfyui_integration import COMFYUI_DIR, post_form, post_prompt, start, wait_done

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")
PASS = "sources integration passphrase"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from conftest import package_file

    server, base, home = start(tmp_path_factory, "enforce = true\n")
    photo = package_file("skimage", "data/astronaut.png")
    fields = {"passphrase": PASS, "passphrase_confirm": PASS, "name": "Astronaut Example",
              "aliases": "", "scope": "any", "consent_by": "Astronaut Example",
              "consent_date": "2024-05-01", "note": "integration test"}
    status, body, _ = post_form(server, "/api/consent_guard/identities/enroll", fields,
                                [("astronaut.png", photo.read_bytes())])
    assert status == 200 and body["ok"], body
    probe = Image.open(photo).convert("RGB").crop((40, 0, 472, 432)).resize((384, 384))
    probe.save(base / "input" / "probe.png")
    yield server, base, home
    server.stop()


def run(server, graph, timeout=300):
    status, body = post_prompt(server, graph)
    assert status == 200, body
    return wait_done(server, body["prompt_id"], timeout)


def files(folder: Path):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def refused(hist) -> str:
    assert hist["status"]["status_str"] == "error", hist["status"]
    return json.dumps(hist["status"]["messages"])


LOAD = {"class_type": "LoadImage", "inputs": {"image": "probe.png"}}
MASK = {"class_type": "LoadImageMask", "inputs": {"image": "probe.png", "channel": "red"}}


def save(src):
    return {"class_type": "SaveImage", "inputs": {"images": src, "filename_prefix": "leak"}}


@pytest.mark.parametrize("name, graph", [
    ("mask, to image, rotated 180, saved", {
        "1": MASK, "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}},
        "3": {"class_type": "ImageRotate", "inputs": {"image": ["2", 0],
                                                      "rotation": "180 degrees"}},
        "4": save(["3", 0])}),
    ("inverted, saved", {
        "1": LOAD, "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": save(["2", 0])}),
    ("rotated 90, previewed", {
        "1": LOAD, "2": {"class_type": "ImageRotate", "inputs": {"image": ["1", 0],
                                                                 "rotation": "90 degrees"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}),
    ("halved, padded by 6000, saved", {
        "1": LOAD, "2": {"class_type": "ImageScaleBy", "inputs": {
            "image": ["1", 0], "upscale_method": "nearest-exact", "scale_by": 0.5}},
        "3": {"class_type": "ImagePadForOutpaint", "inputs": {
            "image": ["2", 0], "left": 0, "top": 0, "right": 6000, "bottom": 0,
            "feathering": 0}},
        "4": save(["3", 0])}),
    ("mask tiles printed by PreviewAny", {
        "1": MASK, "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}},
        "3": {"class_type": "ImageScale", "inputs": {
            "image": ["2", 0], "upscale_method": "bilinear", "width": 128, "height": 128,
            "crop": "disabled"}},
        "4": {"class_type": "ImageToMask", "inputs": {"image": ["3", 0], "channel": "red"}},
        "5": {"class_type": "CropMask", "inputs": {"mask": ["4", 0], "x": 31, "y": 31,
                                                   "width": 31, "height": 31}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}}),
])
def test_a_protected_photo_is_refused_where_it_enters(comfy, name, graph):
    server, base, home = comfy
    messages = refused(run(server, graph))
    assert "Consent Guard" in messages and "protected" in messages, messages
    assert "Astronaut" not in messages  # who is enrolled is never said
    assert files(base / "output") == [] and files(base / "temp") == []


def test_allowed_pictures_still_flow_and_previewany_prints_no_tensor(comfy):
    server, base, home = comfy
    hist = run(server, {
        "1": {"class_type": "LoadImage", "inputs": {"image": "t1.jpg"}},
        "2": {"class_type": "ImageRotate", "inputs": {"image": ["1", 0],
                                                      "rotation": "180 degrees"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": "fine"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}})
    assert hist["status"]["status_str"] == "success", hist["status"]
    assert [f for f in files(base / "output") if f.startswith("fine")] == ["fine_00001_.png"]
    shown = json.dumps(hist["outputs"]["4"])
    assert "tensor(" not in shown and "Consent Guard" in shown, shown
    saved = np.asarray(Image.open(base / "output" / "fine_00001_.png"))
    assert saved.shape[:2] == np.asarray(Image.open(base / "input" / "t1.jpg")).shape[:2]


def test_status_lists_the_source_hooks(comfy):
    server, base, home = comfy
    hooks = server.get("/api/consent_guard/status")["hooks"]
    for name in ("execution.get_output_from_returns", "comfy.sd.CLIP.tokenize"):
        assert hooks.get(name) == "installed", hooks


def hidden_pictures(base: Path) -> None:
    """Two pictures that hide the probe from a detector: in the blue channel of another photo,
    and as grey levels 127/128 (a face a threshold brings back)."""
    probe = np.asarray(Image.open(base / "input" / "probe.png").convert("L"), dtype=np.uint8)
    other = np.asarray(Image.open(base / "input" / "t1.jpg").convert("RGB")
                       .resize(probe.shape[::-1]))
    mixed = other.copy()
    mixed[..., 2] = probe
    Image.fromarray(mixed).save(base / "input" / "in_blue.png")
    flat = np.where(probe > np.median(probe), 128, 127).astype(np.uint8)
    Image.fromarray(np.stack([flat] * 3, -1)).save(base / "input" / "in_grey.png")


@pytest.mark.parametrize("name, graph", [
    ("the blue channel of another photo", {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in_blue.png"}},
        "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "blue"}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": save(["3", 0])}),
    ("two grey levels, thresholded", {
        "1": {"class_type": "LoadImageMask", "inputs": {"image": "in_grey.png",
                                                         "channel": "red"}},
        "2": {"class_type": "ThresholdMask", "inputs": {"mask": ["1", 0], "value": 0.5}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": save(["3", 0])}),
])
def test_a_hidden_protected_face_is_refused_where_a_node_reveals_it(comfy, name, graph):
    server, base, home = comfy
    hidden_pictures(base)
    messages = refused(run(server, graph))
    assert "protected" in messages, messages
    assert [f for f in files(base / "output") if f.startswith("leak")] == []


def revealing_pictures(base: Path) -> None:
    """Pictures that pass the check as they are, from which a stock scale or batch node
    brings the probe back (found by red-teaming this plugin)."""
    from conftest import package_file

    face = Image.open(base / "input" / "probe.png").convert("RGB").resize((512, 512))
    strip = Image.new("RGB", (16384, 512), (128, 128, 128))
    strip.paste(face, (7936, 0))  # 3 px tall in the detector's 640 px copy
    strip.save(base / "input" / "strip.png")
    cat = np.array(Image.open(package_file("skimage", "data/chelsea.png")).convert("RGB")
                   .resize((2048, 2048)))
    cat[2::4, 2::4] = np.asarray(face)  # what nearest-neighbour downscaling by 4 picks
    Image.fromarray(cat).save(base / "input" / "cat.png")
    face.resize((128, 128), Image.Resampling.LANCZOS).save(base / "input" / "tiny.png")


def scale_to_512(name, method="nearest-exact", crop="disabled"):
    return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "ImageScale", "inputs": {
                "image": ["1", 0], "upscale_method": method, "width": 512, "height": 512,
                "crop": crop}},
            "3": save(["2", 0])}


@pytest.mark.parametrize("name, graph", [
    ("a face in a long strip, centre-cropped", scale_to_512("strip.png", crop="center")),
    ("a face in every fourth pixel of a cat", scale_to_512("cat.png")),
    ("a 128 px copy, upscaled", scale_to_512("tiny.png", method="lanczos")),
    ("a face in a long strip, saved as it is", {
        "1": {"class_type": "LoadImage", "inputs": {"image": "strip.png"}},
        "2": save(["1", 0])}),
])
def test_what_a_pure_transform_reveals_is_checked_at_the_saver(comfy, name, graph):
    server, base, home = comfy
    revealing_pictures(base)
    messages = refused(run(server, graph))
    assert "protected" in messages, messages
    assert [f for f in files(base / "output") if f.startswith("leak")] == []


def test_a_batch_that_reveals_a_face_saves_only_the_other_frame(comfy):
    """Image Batch scales and centre-crops its second image to the first's size. The strip is
    refused where it is loaded (its face is found in tiles); were it not, the batch's face
    frame would be left out by the saver."""
    server, base, home = comfy
    revealing_pictures(base)
    hist = run(server, {
        "1": {"class_type": "LoadImage", "inputs": {"image": "strip.png"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512,
                                                      "batch_size": 1, "color": 0}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0],
                                                    "filename_prefix": "batched"}}})
    if hist["status"]["status_str"] == "error":  # refused where the strip was loaded
        assert "LoadImage" in json.dumps(hist["status"]["messages"])
    saved = sorted((base / "output").glob("batched_*.png"))
    assert all(not np.asarray(Image.open(f)).any() for f in saved)  # the empty frame at most
