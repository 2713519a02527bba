"""example_workflows/ (ComfyUI serves it as templates: app/custom_node_manager.py add_routes,
/api/workflow_templates/<folder>): every workflow is a UI-format graph whose Consent Guard
nodes exist, have every required input wired, and sit where they protect something."""
import json
import sys
from pathlib import Path

import pytest

import comfy_standins

torch = pytest.importorskip("torch")

FOLDER = Path(__file__).resolve().parents[1] / "example_workflows"
WORKFLOWS = sorted(FOLDER.glob("*.json"))


@pytest.fixture
def mappings(monkeypatch, tmp_path):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "home"))
    pkg = comfy_standins.install(monkeypatch, tmp_path / "comfy")
    yield pkg.NODE_CLASS_MAPPINGS
    for key in [k for k in sys.modules if k.startswith("custom_nodes_consent_guard_under_test")]:
        del sys.modules[key]


def load(path):
    graph = json.loads(path.read_text())
    links = {row[0]: row for row in graph["links"]}  # [id, from, slot, to, slot, type]
    return graph, links


def test_there_are_examples():
    assert len(WORKFLOWS) >= 3


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_consent_guard_nodes_are_wired(path, mappings):
    graph, links = load(path)
    ours = [n for n in graph["nodes"] if n["type"].startswith("ConsentGuard")]
    assert ours, "an example without a Consent Guard node"
    ids = {n["id"] for n in graph["nodes"]}
    for node in ours:
        assert node["type"] in mappings, node["type"]
        required = mappings[node["type"]].INPUT_TYPES()["required"]
        wired = {i["name"]: i.get("link") for i in node.get("inputs", [])}
        for name, spec in required.items():
            if spec[0] == "IMAGE":
                link = wired.get(name)
                assert link in links, f"{node['type']}.{name} is not connected"
                assert links[link][1] in ids and links[link][3] == node["id"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_stock_saver_and_every_output_is_checked(path):
    """An example must not teach saving around the check: no stock SaveImage/PreviewImage, and
    every decoded or loaded image reaches a Consent Guard node."""
    graph, links = load(path)
    types = {n["id"]: n["type"] for n in graph["nodes"]}
    assert not {"SaveImage", "PreviewImage"} & set(types.values())
    for node in graph["nodes"]:
        if node["type"] in ("VAEDecode", "LoadImage"):
            targets = [links[l][3] for o in node["outputs"] if o["type"] == "IMAGE"
                       for l in (o.get("links") or [])]
            assert targets and all(types[t].startswith("ConsentGuard") for t in targets), \
                f"{node['type']} {node['id']} feeds {[types[t] for t in targets]}"
