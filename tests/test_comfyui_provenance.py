"""The provenance mark and signed verdict in the real ComfyUI (skipped unless COMFYUI_DIR is
set; setup as in test_comfyui_integration.py): enforce mode turns both on, and a stock
SaveImage and Consent Guard's Save Image write files that `consent-guard verify` accepts."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from consent_guard import provenance
from test_comfyui_integration import COMFYUI_DIR, save_graph, start

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    server, base, home = start(tmp_path_factory, "enforce = true\n")
    yield server, base, home
    server.stop()


def test_stock_and_own_savers_write_marked_signed_files(comfy):
    server, base, home = comfy
    stock = {"1": {"class_type": "LoadImage", "inputs": {"image": "t1.jpg"}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                         "filename_prefix": "cg_prov"}}}
    for graph in (stock, save_graph("cg_own")):
        hist = server.run(graph)
        assert hist["status"]["status_str"] == "success", hist["status"]
    records = {json.loads(line)["seq"]: json.loads(line)
               for line in (home / "audit.log").read_text().splitlines()}
    for prefix in ("cg_prov", "cg_own"):
        [saved] = sorted((base / "output").glob(f"{prefix}_*.png"))
        check = provenance.verify_file(saved, home=home)
        assert check.signature.status == "valid", check.signature.problem
        assert check.signature.this_machine is True
        number = check.signature.claim["audit_record"]
        assert records[number]["decision"] == "allow"
        assert check.watermark["found"] and check.watermark["mark_id"] == number % 65536
        assert json.loads(Image.open(saved).text["consent_guard_provenance"])  # a chunk
