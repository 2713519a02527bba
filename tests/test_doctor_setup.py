"""doctor on a fresh machine says "not set up yet" with the steps, not FAIL; its permission
check is right when root runs it; OpenCV is information only, onnxruntime is needed (issue 13
items 1 and 3). Files and folders only: no images."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from consent_guard import admin, cli, doctor

REPO = Path(__file__).resolve().parent.parent
PASS = "correct horse battery"
SETUP_CHECKS = ("enforce mode", "admin lock", "audit log")


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """A ComfyUI with this plugin (the files doctor reads) and no Consent Guard state yet."""
    monkeypatch.setattr(doctor, "_proc_cmdlines", lambda: [])
    base = tmp_path / "ComfyUI"
    plugin = base / "custom_nodes" / "ComfyUI-Consent-Guard"
    for rel in ("consent_guard/engine.py", "nodes/enforce.py", "prestartup_script.py"):
        (plugin / rel).parent.mkdir(parents=True, exist_ok=True)
        (plugin / rel).write_text((REPO / rel).read_text())
    (base / "main.py").write_text("")
    (base / "folder_paths.py").write_text("")
    return base


def by_name(checks):
    return {c.name: c for c in checks}


def test_a_fresh_machine_is_not_set_up_yet_not_failed(comfy, monkeypatch, capsys):
    home = comfy / "user" / "consent_guard"  # does not exist yet
    monkeypatch.delenv("CONSENT_GUARD_HOME", raising=False)
    assert doctor.not_set_up(home)
    checks = by_name(doctor.run(home, comfy))
    for name in SETUP_CHECKS:
        assert checks[name].status == doctor.TODO, checks[name]
        assert "not set up yet" in checks[name].detail
    assert checks["admin lock"].fix == doctor.SETUP_FIX
    code = cli.main(["--comfyui", str(comfy), "doctor"])
    out = capsys.readouterr().out
    assert code == 1  # protection is not active: scripts must not read it as fine
    assert "Consent Guard is not set up yet" in out and "set-up dialog" in out
    assert "consent-guard admin set-passphrase" in out and "consent-guard admin lock" in out
    assert not any(line.startswith("[FAIL] " + n) for n in SETUP_CHECKS
                   for line in out.splitlines())
    assert out.splitlines()[0] == f"[info] home: {home.resolve()} (--comfyui {comfy})"


def test_once_set_up_the_same_gaps_fail(comfy):
    home = comfy / "user" / "consent_guard"
    home.mkdir(parents=True)
    (home / "policy.toml").write_text("enforce = false\n")
    assert not doctor.not_set_up(home)
    checks = by_name(doctor.run(home, comfy))
    assert checks["enforce mode"].status == doctor.FAIL
    assert checks["admin lock"].status == doctor.FAIL


def test_opencv_absent_is_information_onnxruntime_absent_fails(comfy, monkeypatch):
    real = importlib.util.find_spec
    gone = set()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in gone else real(name, *a))
    gone.add("cv2")
    rows = by_name(doctor.runtime_checks())
    assert rows["OpenCV"].status == doctor.INFO and "not installed" in rows["OpenCV"].detail
    assert "does not need it" in rows["OpenCV"].detail
    home = comfy / "user" / "consent_guard"
    checks = doctor.run(home, comfy)
    assert by_name(checks)["OpenCV"].status == doctor.INFO
    gone.add("onnxruntime")
    c = by_name(doctor.runtime_checks())["onnxruntime"]
    assert c.status == doctor.FAIL and "install-models" in c.fix


# -- permissions when root runs doctor ----------------------------------------------------------

root_only = pytest.mark.skipif(sys.platform == "win32" or not hasattr(os, "geteuid")
                               or os.geteuid() != 0, reason="needs root (file ownership)")


@pytest.fixture
def locked_home(comfy):
    """As the lock-down leaves it: root owns everything, folders 0700, files 0600."""
    home = comfy / "user" / "consent_guard"
    home.mkdir(parents=True)
    (home / "policy.toml").write_text("enforce = true\n")
    admin.set_passphrase(home, PASS)
    admin.set_locked(home, True, PASS)
    for p in [comfy, comfy / "user", *comfy.rglob("*")]:
        p.chmod(0o700 if p.is_dir() else 0o600)
    return home


@root_only
def test_root_owned_0700_0600_is_fine_for_a_root_run_doctor(comfy, locked_home):
    c = by_name(doctor.run(locked_home, comfy))["file permissions"]
    assert c.status == doctor.OK, c
    assert "an account other than root cannot change" in c.detail


@root_only
def test_a_root_run_doctor_still_fails_world_writable_and_foreign_files(comfy, locked_home,
                                                                       monkeypatch):
    import pwd

    policy = locked_home / "policy.toml"
    policy.chmod(0o666)
    c = by_name(doctor.run(locked_home, comfy))["file permissions"]
    assert c.status == doctor.FAIL and "policy.toml" in c.detail, c
    assert "an account other than root" in c.detail
    policy.chmod(0o600)
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    script = comfy / "custom_nodes" / "ComfyUI-Consent-Guard" / "prestartup_script.py"
    os.chown(script, nobody.pw_uid, 0)  # owned by another account: it could chmod and write
    c = by_name(doctor.run(locked_home, comfy))["file permissions"]
    assert c.status == doctor.FAIL and "prestartup_script.py" in c.detail, c
    os.chown(script, 0, 0)
    # group-writable: fine only when the group holds nobody but root
    script.chmod(0o660)
    monkeypatch.setattr(doctor, "_group_has_others", lambda gid: False)
    assert by_name(doctor.run(locked_home, comfy))["file permissions"].status == doctor.OK
    monkeypatch.setattr(doctor, "_group_has_others", lambda gid: True)
    assert by_name(doctor.run(locked_home, comfy))["file permissions"].status == doctor.FAIL


def test_a_non_root_doctor_asks_the_system_as_before(comfy, monkeypatch, tmp_path):
    """Not root (simulated): the question is whether this account can write."""
    monkeypatch.setattr(doctor, "_is_root", lambda: False)
    f = tmp_path / "f"
    f.write_text("x")
    assert doctor._writable_by(f, None) == os.access(f, os.W_OK)


def test_group_with_only_root_has_no_others():
    import grp

    try:
        root_group = grp.getgrgid(0)
    except KeyError:
        pytest.skip("no group 0")
    expected = any(m != "root" for m in root_group.gr_mem)
    if not expected:
        import pwd
        expected = any(pw.pw_gid == 0 and pw.pw_uid != 0 for pw in pwd.getpwall())
    doctor._group_has_others.cache_clear()
    assert doctor._group_has_others(0) == expected
    assert doctor._group_has_others(2 ** 31 - 3)  # no such group: fail closed


def test_doctor_json_starts_with_the_home_and_why(comfy, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "h"))
    cli.main(["doctor", "--comfyui", str(comfy), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert rows[0] == {"check": "home", "status": doctor.INFO,
                       "detail": f"{tmp_path / 'h'} ($CONSENT_GUARD_HOME is set)", "fix": ""}


@root_only
def test_the_audit_log_is_checked_for_the_named_user(comfy, locked_home):
    import pwd

    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    log = locked_home / "audit.log"
    log.write_text("")
    log.chmod(0o600)  # root's alone: ComfyUI running as nobody could not record anything
    c = by_name(doctor.run(locked_home, comfy, user="nobody"))["audit log"]
    assert c.status == doctor.FAIL and "by user nobody" in c.detail, c
    log.chmod(0o666)
    assert by_name(doctor.run(locked_home, comfy, user="nobody"))["audit log"].status == \
        doctor.OK


def test_doctor_runs_the_face_models_too(comfy, tmp_path):
    """The models check runs every default model, the face models' float copies and the age
    model included; one that cannot be found is a failure naming it, not an explicit-models-
    only pass. (The face models' float copies are sha256-checked files of their own: a cached
    one does not need its int8 source.)"""
    home = comfy / "user" / "consent_guard"
    home.mkdir(parents=True, exist_ok=True)
    c = by_name(doctor.run(home, comfy))["models"]
    assert c.status == doctor.OK and "yunet_float" in c.detail and "sface_float" in c.detail
    (home / "policy.toml").write_text(f'[models.paths]\nage_v1 = "{tmp_path / "gone.onnx"}"\n')
    c = by_name(doctor.run(home, comfy))["models"]
    assert c.status == doctor.FAIL and "age_v1" in c.detail and "gone.onnx" in c.detail
