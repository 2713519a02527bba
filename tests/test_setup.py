"""consent_guard/setup.py: the first-run set-up (one admin passphrase that also seals the
registry, enforce mode, the lock), its refusals and what a failure halfway leaves."""
from __future__ import annotations

import json

import pytest

from consent_guard import admin, expect, setup
from consent_guard.audit import read_records, verify_log
from consent_guard.policy import load_policy
from consent_guard.registry import LockedError, Registry

PASS = "first run passphrase"
OLD = "old registry passphrase"


def run(home, passphrase=PASS, confirm=PASS, **kw):
    kw.setdefault("enforce", True)
    kw.setdefault("locked", True)
    return setup.run_setup(home, passphrase, confirm, **kw)


def test_fresh_home_creates_everything_sealed_with_one_passphrase(tmp_path):
    assert setup.describe(tmp_path)["set_up"] is False
    result = run(tmp_path)
    assert result.registry == "created" and result.enforce and result.locked
    assert admin.verify(tmp_path, PASS) and admin.is_locked(tmp_path)
    with Registry.open(tmp_path / "identities.db", passphrase=PASS) as reg:  # the same one
        assert reg.identities() == []
    Registry.open(tmp_path / "identities.db", key_file=tmp_path / "registry.key",
                  read_only=True).close()  # ComfyUI can read it unattended
    assert load_policy(home=tmp_path).enforce is True
    record = expect.read(tmp_path)
    assert record["policy"]["sha256"] == expect.sha256_of(tmp_path / "policy.toml")
    assert record["registry"]["path"] == str(tmp_path / "identities.db")
    assert expect.problems(tmp_path, load_policy(home=tmp_path), tmp_path / "identities.db",
                           tmp_path / "registry.key") == ([], [])
    assert setup.describe(tmp_path)["set_up"] is True
    assert PASS not in json.dumps(result.to_dict())


def test_audited_without_the_passphrase(tmp_path):
    run(tmp_path, enforce=False, locked=False)
    records = list(read_records(tmp_path / "audit.log"))
    assert [r["kind"] for r in records] == ["admin"]
    assert "set-up" in records[0]["note"] and "enforce off" in records[0]["note"]
    assert PASS not in (tmp_path / "audit.log").read_text()
    assert verify_log(tmp_path / "audit.log").problems == []  # in the MAC chain


def test_enforce_off_and_unlocked(tmp_path):
    run(tmp_path, enforce=False, locked=False)
    assert load_policy(home=tmp_path).enforce is False
    assert admin.state(tmp_path) == admin.AdminState(True, False)


def test_second_setup_is_refused_and_changes_nothing(tmp_path):
    run(tmp_path, enforce=False, locked=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()
              and p.name != "audit.log" and not p.name.startswith("audit")}
    with pytest.raises(setup.SetupError) as err:
        run(tmp_path, passphrase="another passphrase!", confirm="another passphrase!")
    assert err.value.code == setup.ALREADY_SET_UP and err.value.status == 409
    after = {name: (tmp_path / name).read_bytes() for name in before}
    assert after == before
    assert admin.verify(tmp_path, PASS)


@pytest.mark.parametrize("passphrase, confirm, code", [
    ("", "", setup.PASSPHRASE_MISSING), (None, None, setup.PASSPHRASE_MISSING),
    ("short", "short", setup.PASSPHRASE_TOO_SHORT),
    (PASS, PASS + "x", setup.PASSPHRASE_MISMATCH), (PASS, None, setup.PASSPHRASE_MISMATCH)])
def test_bad_passphrases_write_nothing(tmp_path, passphrase, confirm, code):
    with pytest.raises(setup.SetupError) as err:
        run(tmp_path, passphrase, confirm)
    assert err.value.code == code
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_existing_policy_keeps_its_other_lines(tmp_path):
    text = ("# mine\nversion = 1\nenforce = false  # off for now\n\n[actions]\n"
            "nudity = \"block\"\n")
    (tmp_path / "policy.toml").write_text(text)
    run(tmp_path)
    new = (tmp_path / "policy.toml").read_text()
    assert new == text.replace("enforce = false  # off for now", "enforce = true")
    policy = load_policy(home=tmp_path)
    assert policy.enforce and policy.actions["nudity"].value == "block"


def test_with_enforce_adds_the_key_above_the_first_table():
    text = "[actions]\nnudity = \"block\"\n"
    out = setup.with_enforce(text, True)
    assert out == "enforce = true\n" + text
    assert "enforce = false" in setup.with_enforce(None, False)
    # an `enforce` inside a table is another key: the top-level one is added
    assert setup.with_enforce("[x]\nenforce = 1\n", False).startswith("enforce = false\n")


def test_broken_policy_refuses_before_writing(tmp_path):
    (tmp_path / "policy.toml").write_text("enforce = maybe\n")
    with pytest.raises(setup.SetupError) as err:
        run(tmp_path)
    assert err.value.code == setup.POLICY_INVALID
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.toml"]


def make_registry(home, passphrase):
    Registry.create(home / "identities.db", passphrase, key_file=home / "registry.key").close()


def test_registry_with_the_same_passphrase_is_kept(tmp_path):
    make_registry(tmp_path, PASS)
    assert setup.describe(tmp_path)["registry_exists"] is True
    assert run(tmp_path).registry == "kept"


def test_registry_with_another_passphrase_needs_it_then_is_resealed(tmp_path):
    make_registry(tmp_path, OLD)
    with pytest.raises(setup.SetupError) as err:
        run(tmp_path)
    assert err.value.code == setup.REGISTRY_PASSPHRASE_NEEDED
    assert "registry passphrase" in str(err.value)
    assert not admin.state(tmp_path).has_passphrase  # nothing set up
    with pytest.raises(setup.SetupError) as err:
        run(tmp_path, registry_passphrase="not the old one")
    assert err.value.code == setup.REGISTRY_PASSPHRASE_WRONG and err.value.status == 403
    assert not admin.state(tmp_path).has_passphrase
    Registry.open(tmp_path / "identities.db", passphrase=OLD).close()  # untouched

    assert run(tmp_path, registry_passphrase=OLD).registry == "resealed"
    Registry.open(tmp_path / "identities.db", passphrase=PASS).close()
    with pytest.raises(LockedError):
        Registry.open(tmp_path / "identities.db", passphrase=OLD)
    # the key file still opens it: ComfyUI reads it unattended as before
    Registry.open(tmp_path / "identities.db", key_file=tmp_path / "registry.key",
                  read_only=True).close()


def test_failure_after_the_registry_says_what_was_done_and_can_be_run_again(tmp_path,
                                                                           monkeypatch):
    def broken(*a, **kw):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(admin, "create", broken)
    with pytest.raises(setup.SetupError) as err:
        run(tmp_path)
    assert err.value.code == setup.WRITE_FAILED and err.value.status == 500
    message = str(err.value)
    assert "disk full" in message and "identity registry created" in message
    assert "run set-up again with the same admin passphrase" in message
    assert not setup.is_set_up(tmp_path)
    monkeypatch.undo()
    assert run(tmp_path).registry == "kept"  # the same passphrase opens what was made
    assert admin.verify(tmp_path, PASS)


def test_admin_create_refuses_an_existing_admin_file(tmp_path):
    admin.create(tmp_path, PASS, locked=True)
    assert admin.state(tmp_path) == admin.AdminState(True, True)
    with pytest.raises(admin.AdminError):
        admin.create(tmp_path, "someone else's", locked=False)
    assert admin.verify(tmp_path, PASS)
    assert oct((tmp_path / "admin.json").stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["admin.json"]  # no temporary left
