"""Issue 12, item 5: a policy or registry that existed must not silently become "none". The
admin's record (consent_guard/expect.py, <home>/expected.json) keeps what was approved, and
everything that builds an engine refuses when a recorded file is missing or the approved
policy was swapped: ComfyUI's get_engine, the helper the command line's scan should use, and
the prestartup guard. Nothing explicit: an empty registry and plain policies stand in."""
from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

import comfy_standins
from consent_guard import admin, expect
from consent_guard.cli import main
from consent_guard.policy import load_policy
from consent_guard.registry import Registry, registry_paths

REPO = Path(__file__).resolve().parent.parent
PASS = "correct horse battery"


def make_registry(home: Path) -> None:
    Registry.create(home / "identities.db", PASS, key_file=home / "registry.key").close()


def away(path: Path) -> Path:
    """Move a file aside, as the attacker in the issue did; returns where it went."""
    moved = path.with_name(path.name + ".moved")
    path.rename(moved)
    return moved


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(h))
    monkeypatch.delenv("CONSENT_GUARD_PASSPHRASE", raising=False)
    return h


def refusals(home: Path):
    policy = load_policy(home=home)
    db, key = registry_paths(policy, home)
    return expect.problems(home, policy, db, key)[0]


# -- the record itself ---------------------------------------------------------------------

def test_first_lock_approves_the_policy_and_a_removed_one_is_refused(home):
    (home / "policy.toml").write_text("enforce = true\n")
    admin.set_passphrase(home, PASS)
    admin.set_locked(home, True, PASS)
    record = json.loads((home / "expected.json").read_text())
    assert record["policy"]["sha256"] == expect.sha256_of(home / "policy.toml")
    assert record["policy"]["enforce"] is True
    assert refusals(home) == []
    away(home / "policy.toml")
    [why] = refusals(home)
    assert "policy" in why and "missing" in why and expect.APPROVE_COMMAND in why


def test_a_changed_policy_is_refused_in_enforce_mode_only(home):
    (home / "policy.toml").write_text("enforce = true\n")
    expect.record_policy(home)
    (home / "policy.toml").write_text("enforce = true\n[actions]\nsexual = 'allow'\n")
    [why] = refusals(home)
    assert "changed since the admin approved it" in why and expect.APPROVE_COMMAND in why
    (home / "policy.toml").write_text("enforce = false\n")  # the approved one enforced
    assert refusals(home)
    (home / "policy.toml").write_text("enforce = false\n")
    expect.record_policy(home)
    (home / "policy.toml").write_text("enforce = false\n[censor]\nstyle = 'pixelate'\n")
    policy = load_policy(home=home)
    db, key = registry_paths(policy, home)
    refused, notes = expect.problems(home, policy, db, key)
    assert refused == [] and "enforce mode is off" in notes[0]
    (home / "policy.toml").write_text("enforce = true\n")  # turned on without the admin
    assert refusals(home)


def test_a_recorded_registry_that_is_missing_or_moved_refuses(home):
    make_registry(home)
    policy = load_policy(home=home)
    reg = expect.open_registry(policy, home)  # first seen: recorded
    reg.close()
    assert json.loads((home / "expected.json").read_text())["registry"]["path"] == \
        str(home / "identities.db")
    moved = away(home / "identities.db")
    with pytest.raises(expect.ExpectationError, match="identities.db is missing"):
        expect.open_registry(policy, home)
    moved.rename(home / "identities.db")
    (home / "policy.toml").write_text(f'[identities]\nregistry = "{home / "empty.db"}"\n')
    with pytest.raises(expect.ExpectationError, match="the admin's registry is"):
        expect.open_registry(load_policy(home=home), home)


def test_a_key_file_without_its_registry_means_a_registry_existed(home):
    make_registry(home)  # never opened by a checker: nothing recorded
    assert not (home / "expected.json").exists()
    away(home / "identities.db")
    with pytest.raises(expect.ExpectationError, match="registry key file .* is there"):
        expect.open_registry(load_policy(home=home), home)


def test_an_unreadable_record_fails_closed(home):
    (home / "expected.json").write_text("{broken")
    [why] = refusals(home)
    assert "cannot be read" in why


def test_nothing_recorded_and_nothing_there_is_fine(home):
    assert refusals(home) == []
    assert expect.open_registry(load_policy(home=home), home) is None


# -- the admin's commands --------------------------------------------------------------------

def test_approve_policy_and_forget_registry_need_the_admin(home, capsys):
    (home / "policy.toml").write_text("enforce = true\n")
    admin.set_passphrase(home, PASS)  # not locked: the passphrase is still needed here
    good, bad = home.parent / "good", home.parent / "bad"
    good.write_text(PASS + "\n")
    bad.write_text("a wrong passphrase\n")
    (home / "policy.toml").write_text("enforce = true\n[actions]\nsexual = 'block'\n")
    assert refusals(home)
    assert main(["admin", "approve-policy", "--passphrase-file", str(bad)]) == 2
    assert "Wrong admin passphrase" in capsys.readouterr().err and refusals(home)
    assert main(["admin", "approve-policy", "--passphrase-file", str(good)]) == 0
    assert "approved" in capsys.readouterr().out and refusals(home) == []
    (home / "policy.toml").write_text("enforce = 'maybe'\n")
    assert main(["admin", "approve-policy", "--passphrase-file", str(good)]) == 2
    assert "not approved" in capsys.readouterr().err

    (home / "policy.toml").write_text("enforce = true\n[actions]\nsexual = 'block'\n")
    make_registry(home)
    expect.record_registry(home, home / "identities.db", home / "registry.key")
    (home / "identities.db").unlink()
    (home / "registry.key").unlink()
    assert refusals(home)
    assert main(["admin", "forget-registry", "--passphrase-file", str(bad)]) == 2
    assert main(["admin", "forget-registry", "--passphrase-file", str(good)]) == 0
    assert refusals(home) == []


def test_cli_scan_refuses_when_the_registry_is_gone(home, tmp_path, capsys):
    """The issue's repro on the command line: scan said allow, exit 0."""
    make_registry(home)
    expect.record_registry(home, home / "identities.db", home / "registry.key")
    away(home / "identities.db")
    img = tmp_path / "grey.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(img)
    assert main(["scan", str(img)]) == 2
    assert "identities.db is missing" in capsys.readouterr().err


# -- ComfyUI: get_engine -----------------------------------------------------------------------

@pytest.fixture
def bridge(home, monkeypatch, tmp_path):
    pkg = comfy_standins.install(monkeypatch, tmp_path / "comfy")
    yield sys.modules[pkg.__name__ + ".nodes.comfy_bridge"]
    for key in [k for k in sys.modules if k.startswith(pkg.__name__)]:
        del sys.modules[key]


def test_get_engine_refuses_when_the_registry_is_moved_away(bridge, home):
    """The issue's repro: ComfyUI running, identities.db moved away, registry.key still there.
    With the record and without it (the in-process memory and the key file), it refuses."""
    (home / "policy.toml").write_text("enforce = true\n")
    make_registry(home)
    assert bridge.get_engine().registry is not None
    assert "registry" in json.loads((home / "expected.json").read_text())  # first seen
    moved = away(home / "identities.db")
    with pytest.raises(bridge.ConsentGuardError, match="identities.db"):
        bridge.get_engine()
    (home / "expected.json").unlink()  # the record gone too: still refused
    (home / "registry.key").rename(home / "registry.key.moved")  # and the key file
    with pytest.raises(bridge.ConsentGuardError, match="was open in this ComfyUI"):
        bridge.get_engine()
    moved.rename(home / "identities.db")
    (home / "registry.key.moved").rename(home / "registry.key")
    assert bridge.get_engine().registry is not None


def test_get_engine_refuses_a_removed_or_swapped_policy_until_approved(bridge, home):
    (home / "policy.toml").write_text("enforce = true\n")
    admin.set_passphrase(home, PASS)
    admin.set_locked(home, True, PASS)
    assert bridge.get_engine().policy.enforce
    moved = away(home / "policy.toml")
    assert bridge.policy_state()[1] == "missing"  # enforce.py then keeps enforce mode on
    with pytest.raises(bridge.ConsentGuardError, match="policy .* is missing"):
        bridge.get_engine()
    moved.rename(home / "policy.toml")
    assert bridge.get_engine().policy.enforce
    (home / "policy.toml").write_text("enforce = false\n")
    with pytest.raises(bridge.ConsentGuardError, match="approve-policy"):
        bridge.get_engine()
    expect.record_policy(home)  # what `consent-guard admin approve-policy` does
    assert bridge.get_engine().policy.enforce is False


def test_ui_enrolment_records_the_new_registry_for_an_unlocked_user(bridge, home, monkeypatch):
    """No admin passphrase, no lock: the first enrolment from the dialog creates the registry,
    and the record says so, so moving it away later refuses."""
    from consent_guard.faces.enrol import PhotoCheck
    from consent_guard.identities import Enrolment
    from consent_guard.registry import Identity

    routes = sys.modules[bridge.__name__.rsplit(".", 1)[0] + ".routes"]

    def fake_enrol(policy, where, passphrase, **kw):  # a test double at the enrol interface
        make_registry(where)
        ident = Identity("id_0123456789ab", kw["name"], kw["scope"], (), kw["consent"])
        return Enrolment(ident, [PhotoCheck("<image>", True, "one face")], ["opencv"], [])
    shared = routes.admin_api  # the enrolment logic the dialog's route runs (admin_api.enrol)
    monkeypatch.setattr(shared, "enrol_person", fake_enrol)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 90, 90)).save(buf, format="PNG")
    form = shared.EnrolForm(PASS, "Ms Example", "any", "Ms Example",
                            [shared.Photo("a.png", buf.getvalue())], consent_date="2024-05-01",
                            passphrase_confirm=PASS)
    reply = shared.enrol(routes.SITE, form, "192.0.2.7")
    assert reply.status == 200, reply.body
    assert json.loads((home / "expected.json").read_text())["registry"]["path"] == \
        str(home / "identities.db")
    away(home / "identities.db")
    (home / "registry.key").unlink()
    with pytest.raises(bridge.ConsentGuardError, match="identities.db is missing"):
        bridge.get_engine()


# -- the prestartup guard ----------------------------------------------------------------------

def boot(tmp_path, monkeypatch, name):
    """Run prestartup_script.py as ComfyUI does, with a stand-in `execution` module."""
    monkeypatch.delitem(sys.modules, "_consent_guard_enforce", raising=False)
    execution = types.ModuleType("execution")

    async def validate_prompt(prompt_id, prompt, partial):
        return (True, None, [], {})
    execution.validate_prompt = validate_prompt
    monkeypatch.setitem(sys.modules, "execution", execution)
    spec = importlib.util.spec_from_file_location(name, REPO / "prestartup_script.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    try:
        return asyncio.run(execution.validate_prompt("p", {}, None))
    finally:
        sys.modules.pop("_consent_guard_enforce", None)


def test_prestartup_keeps_enforce_on_when_the_approved_policy_is_gone(home, tmp_path,
                                                                     monkeypatch):
    (home / "policy.toml").write_text("enforce = true\n")
    expect.record_policy(home)
    moved = away(home / "policy.toml")
    ok, error, _, _ = boot(tmp_path, monkeypatch, "cg_pre_a")
    assert not ok and "missing" in error["message"] and expect.APPROVE_COMMAND in \
        error["message"]
    moved.rename(home / "policy.toml")
    (home / "policy.toml").write_text("enforce = false\n")  # swapped for one that is off
    ok, error, _, _ = boot(tmp_path, monkeypatch, "cg_pre_b")
    assert not ok and "changed since the admin approved it" in error["message"]
    expect.record_policy(home)  # the admin approves it: enforce is off, nothing refused
    assert boot(tmp_path, monkeypatch, "cg_pre_c")[0] is True
    (home / "expected.json").write_text("not json")
    ok, error, _, _ = boot(tmp_path, monkeypatch, "cg_pre_d")
    assert not ok and "cannot be read" in error["message"]
