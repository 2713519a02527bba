"""Issue 12, items 5 and 6, against the real ComfyUI (skipped unless COMFYUI_DIR is set; setup
as in test_comfyui_integration.py): with ComfyUI running in enforce mode, moving the identity
registry or the policy away refuses instead of allowing; the status route says which home,
policy and registry the server runs with, and `doctor --url` fails a ComfyUI started with
another CONSENT_GUARD_HOME. Benign photo only (t1.jpg); the registry is empty: what is tested
is that its absence is noticed."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from test_comfyui_integration import COMFYUI_DIR, Comfy, post_prompt, start, wait_done

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")
PASS = "integration admin passphrase"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from consent_guard import admin
    from consent_guard.registry import Registry

    server, base, home = start(tmp_path_factory, "enforce = true\n")
    admin.set_passphrase(home, PASS)
    admin.set_locked(home, True, PASS)  # approves the policy as it is
    Registry.create(home / "identities.db", PASS, key_file=home / "registry.key").close()
    yield server, base, home
    server.stop()


def save(server, prefix: str) -> dict:
    """Queue LoadImage -> SaveImage; the history entry, or for a submission refused before
    queueing (the prompt gate cannot build its checker either) a stand-in with its message."""
    status, body = post_prompt(server, {
        "1": {"class_type": "LoadImage", "inputs": {"image": "t1.jpg"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                    "filename_prefix": prefix}}})
    if status == 400:
        return {"status": {"status_str": "error", "messages": [body]}}
    assert status == 200, body
    return wait_done(server, body["prompt_id"])


def saved(base: Path, prefix: str):
    return sorted((base / "output").glob(f"{prefix}_*.png"))


def moved(path: Path) -> Path:
    target = path.with_name(path.name + ".moved")
    path.rename(target)
    time.sleep(0.05)
    return target


def test_1_status_says_which_home_policy_and_registry(comfy):
    from consent_guard.expect import sha256_of

    server, base, home = comfy
    hist = save(server, "cg_exp_ok")  # also lets the engine see (and record) the registry
    assert hist["status"]["status_str"] == "success", hist["status"]
    setup = server.get("/api/consent_guard/status")["setup"]
    assert setup["home"] == str(home)
    assert setup["policy"]["sha256"] == sha256_of(home / "policy.toml")
    assert setup["registry"] == {"path": str(home / "identities.db"), "exists": True,
                                 "identities": 0}
    record = json.loads((home / "expected.json").read_text())
    assert record["registry"]["path"] == str(home / "identities.db")


def test_2_registry_moved_away_while_running_refuses(comfy):
    server, base, home = comfy
    back = moved(home / "identities.db")  # registry.key stays, as in the issue
    try:
        hist = save(server, "cg_exp_noreg")
        assert hist["status"]["status_str"] == "error", hist["status"]
        assert "identities.db" in json.dumps(hist["status"]["messages"])
        assert saved(base, "cg_exp_noreg") == []
    finally:
        back.rename(home / "identities.db")
    time.sleep(0.05)
    assert save(server, "cg_exp_back")["status"]["status_str"] == "success"
    assert len(saved(base, "cg_exp_back")) == 1


def test_3_policy_moved_away_or_swapped_refuses_until_approved(comfy):
    server, base, home = comfy
    back = moved(home / "policy.toml")
    try:
        hist = save(server, "cg_exp_nopol")
        assert hist["status"]["status_str"] == "error", hist["status"]
        assert "approve-policy" in json.dumps(hist["status"]["messages"])
        assert saved(base, "cg_exp_nopol") == []
    finally:
        back.rename(home / "policy.toml")
    approved = (home / "policy.toml").read_text()
    (home / "policy.toml").write_text("enforce = false\n")
    time.sleep(0.05)
    try:
        hist = save(server, "cg_exp_swapped")
        assert hist["status"]["status_str"] == "error", hist["status"]
        assert saved(base, "cg_exp_swapped") == []
    finally:
        (home / "policy.toml").write_text(approved)
        time.sleep(0.05)
    assert save(server, "cg_exp_again")["status"]["status_str"] == "success"


def test_4_doctor_fails_a_comfyui_with_another_home(comfy, tmp_path_factory):
    """The issue's repro: another CONSENT_GUARD_HOME with an allow-all policy, no registry.
    Its hooks are armed and it enforces; doctor compares it with the admin's home."""
    from consent_guard import doctor

    server, base, home = comfy
    other_base = tmp_path_factory.mktemp("comfy_other")
    (other_base / "custom_nodes").mkdir()
    (other_base / "custom_nodes" / "consent_guard").symlink_to(
        (base / "custom_nodes" / "consent_guard").resolve(), target_is_directory=True)
    other_home = tmp_path_factory.mktemp("cg_other_home")
    (other_home / "policy.toml").write_text("enforce = true\n[actions]\nsexual = \"allow\"\n"
                                            "nudity = \"allow\"\n")
    other = Comfy(other_base, other_home)
    try:
        status = other.get("/api/consent_guard/status")
        assert status["armed"] and status["enforce"]
        assert status["setup"]["registry"]["identities"] == "none"
        checks = {c.name: c for c in doctor.run(home, base, url=other.url)}
        for name in ("same home", "same policy", "same registry"):
            assert checks[name].status == doctor.FAIL, checks[name]
        mine = {c.name: c for c in doctor.run(home, base, url=server.url)}
        for name in ("same home", "same policy", "same registry", "engine"):
            assert mine[name].status == doctor.OK, mine[name]
    finally:
        other.stop()
