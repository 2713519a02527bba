"""`consent-guard lockdown` with two real OS accounts (issue 12 item 7): after it, the account
ComfyUI runs as can match and scan against the registry and append to the audit log, but
cannot change the registry, the policy or the folder; any other account cannot read the
registry key. Needs root and useradd (skipped otherwise): the test creates two throw-away
accounts and removes them. The unprivileged side runs in a child process that imports what it
needs, then drops to the account with setgid/setuid (this Python may live where other accounts
cannot read, so nothing is imported after the drop). Benign random images, detector doubles, a
registry of random vectors: no face, no explicit content."""
from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from consent_guard import cli
from consent_guard.audit import AuditLog, verify_log
from consent_guard.policy import DEFAULT_POLICY_TOML
from consent_guard.registry import Consent, Registry
from consent_guard.verdict import Decision, Verdict

from conftest import FakeFaces, keyed_image

pytestmark = pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0 or shutil.which("useradd") is None,
    reason="needs root and useradd to create two real accounts")

REPO = Path(__file__).resolve().parent.parent
PASS = "admin passphrase 1"
MODEL = "fake-000000000001"

# The child: imports first, then becomes the account, then does what argv[2] says and prints
# one JSON object.
CHILD = textwrap.dedent("""
    import json, os, sys, errno, sqlite3, encodings.ascii, encodings.utf_8, encodings.latin_1
    sys.path[:0] = [sys.argv[4], sys.argv[5]]
    from PIL import Image
    Image.init()
    import numpy as np
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    from cryptography.exceptions import InvalidTag
    from consent_guard import cli, Engine
    from consent_guard.audit import AuditLog
    from consent_guard.registry import Registry, Consent, RegistryError
    from consent_guard.verdict import Verdict, Decision
    import consent_guard.faces.matching, consent_guard.faces.stage, consent_guard.faces.base
    from conftest import FakeParts, FakeScorer, fake_backend
    import io, contextlib

    user, action, home = sys.argv[1], sys.argv[2], sys.argv[3]
    import pwd
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["CONSENT_GUARD_HOME"] = home
    os.environ.pop("CONSENT_GUARD_PASSPHRASE", None)
    backend = fake_backend({30: ["alice"]})
    cli.Engine = lambda policy, **kw: Engine(policy, parts=FakeParts(), scorer=FakeScorer(),
                                             face_backend=backend, **kw)

    def run_cli(*argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(argv))
        return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

    def attempt(fn):
        try:
            fn()
            return "done"
        except Exception as exc:
            return type(exc).__name__ + ": " + str(exc)

    result = {}
    if action == "service":
        result["scan_public"] = run_cli("scan", "--json", sys.argv[6])
        result["scan_all"] = run_cli("scan", "--json", sys.argv[7])
        result["list"] = run_cli("identity", "list", "--json")
        db = os.path.join(home, "identities.db")
        key = os.path.join(home, "registry.key")
        def enrol():
            with Registry.open(db, key_file=key) as reg:
                reg.add("Mallory", "any", Consent("m"), {"m": np.ones((1, 16), np.float32)})
        def raw_sql():
            c = sqlite3.connect(db)
            c.execute("DELETE FROM embedding")
            c.commit()
        result["enrol"] = attempt(enrol)
        result["raw_sql"] = attempt(raw_sql)
        result["policy"] = attempt(lambda: open(os.path.join(home, "policy.toml"), "a").write("x"))
        result["new_file"] = attempt(lambda: open(os.path.join(home, "policy2.toml"), "w"))
        result["rename_db"] = attempt(lambda: os.rename(db, db + ".gone"))
        result["journal"] = attempt(lambda: open(db + "-journal", "wb"))
        log = AuditLog(os.path.join(home, "audit.log"))
        result["audit"] = log.record("image", Verdict(Decision.ALLOW), source="comfyui")
        result["audit_error"] = log.last_error
    else:
        result["read_key"] = attempt(lambda: open(os.path.join(home, "registry.key")).read())
        result["read_audit_key"] = attempt(lambda: open(os.path.join(home, "audit.key")).read())
        result["list"] = run_cli("identity", "list", "--json")
    print(json.dumps(result))
""")


def _add_user(name: str) -> None:
    subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin",
                    name], check=True, capture_output=True)


def _del_user(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def accounts():
    tag = secrets.token_hex(3)
    names = (f"cgsvc{tag}", f"cgoth{tag}")
    try:
        for n in names:
            _add_user(n)
    except subprocess.CalledProcessError as exc:
        for n in names:
            _del_user(n)
        pytest.skip(f"useradd failed: {exc.stderr.decode(errors='replace')}")
    yield names
    for n in names:
        _del_user(n)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A home as the admin leaves it before the lock-down: a WAL registry (older versions),
    a policy, an audit log with records, all root's; images readable by anyone."""
    base = Path(tempfile.mkdtemp(prefix="cg-lockdown-", dir="/tmp"))
    os.chmod(base, 0o755)
    home = base / "home"
    home.mkdir(mode=0o755)
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    (home / "policy.toml").write_text(DEFAULT_POLICY_TOML)
    with Registry.create(home / "identities.db", PASS, key_file=home / "registry.key") as reg:
        reg.add("Alice Example", "any", Consent("Alice"), {MODEL: FakeFaces.vector("alice")[None]})
    conn = sqlite3.connect(home / "identities.db")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    AuditLog(home / "audit.log").record("image", Verdict(Decision.ALLOW), source="cli")
    public = base / "imgs" / "public"
    public.mkdir(parents=True)
    for name, key in (("a.png", 1), ("alice.png", 30)):
        Image.fromarray(keyed_image(key)).save(public / name)
    private = base / "imgs" / "private"
    private.mkdir()
    Image.fromarray(keyed_image(2)).save(private / "b.png")
    for p in (base / "imgs", public):
        os.chmod(p, 0o755)
    os.chmod(private, 0o700)  # root's: the service account cannot list it
    yield base, home
    shutil.rmtree(base, ignore_errors=True)


def as_user(user: str, action: str, base: Path, home: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, user, action, str(home), str(REPO),
                        str(REPO / "tests"), str(base / "imgs" / "public"), str(base / "imgs")],
                       capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def mode_of(path: Path) -> tuple:
    st = os.stat(path)
    return oct(stat.S_IMODE(st.st_mode)), pwd.getpwuid(st.st_uid).pw_name, \
        grp.getgrgid(st.st_gid).gr_name


def test_lockdown_with_two_real_accounts(accounts, setup, capsys):
    service, other = accounts
    base, home = setup
    assert cli.main(["lockdown", "--service-user", service, "-q"]) == 0
    capsys.readouterr()
    assert mode_of(home) == ("0o750", "root", service)
    assert mode_of(home / "registry.key") == ("0o640", "root", service)
    assert mode_of(home / "identities.db") == ("0o640", "root", service)
    assert mode_of(home / "policy.toml") == ("0o640", "root", service)
    assert mode_of(home / "audit.key") == ("0o640", "root", service)
    for name in ("audit.log", "audit.log.lock", "audit.head"):
        assert mode_of(home / name) == ("0o660", "root", service)
    conn = sqlite3.connect(home / "identities.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()

    got = as_user(service, "service", base, home)
    # matching and scanning work read-only: Alice is found, the other image allowed
    scan = got["scan_public"]
    rows = {Path(json.loads(x)["path"]).name: json.loads(x) for x in scan["out"].splitlines()}
    assert scan["code"] == 1, scan["err"]
    assert rows["a.png"]["decision"] == "allow" and rows["alice.png"]["decision"] == "block"
    assert got["list"]["code"] == 0 and json.loads(got["list"]["out"])["name"] == "Alice Example"
    # a folder it cannot list is a result with an error, not a silent skip
    everything = got["scan_all"]
    rows = {Path(json.loads(x)["path"]).name: json.loads(x) for x in everything["out"].splitlines()}
    assert everything["code"] == 2 and "Permission denied" in rows["private"]["error"]
    # it cannot change anything the admin owns
    assert "read-only" in got["enrol"] or "readonly" in got["enrol"], got["enrol"]
    assert "readonly" in got["raw_sql"], got["raw_sql"]
    for attempt in ("policy", "new_file", "rename_db", "journal"):
        assert got[attempt].startswith("PermissionError"), (attempt, got[attempt])
    # but it appends to the audit log, and the log still verifies
    assert got["audit"] is True, got["audit_error"]
    assert verify_log(home / "audit.log").problems == []

    # the admin still enrols; owners and modes stay, so ComfyUI keeps reading
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        reg.add("Second Person", "explicit", Consent("S"), {MODEL: FakeFaces.vector("bob")[None]})
        reg.write_key_file(home / "registry.key")  # `identity key-file` keeps the group read
    assert mode_of(home / "identities.db") == ("0o640", "root", service)
    assert mode_of(home / "registry.key") == ("0o640", "root", service)
    assert not list(home.glob("identities.db-*"))  # no journal left behind
    got = as_user(service, "service", base, home)
    names = [json.loads(x)["name"] for x in got["list"]["out"].splitlines()]
    assert names == ["Alice Example", "Second Person"]

    got = as_user(other, "other", base, home)
    assert got["read_key"].startswith("PermissionError")
    assert got["read_audit_key"].startswith("PermissionError")
    assert got["list"]["code"] == 2 and "Alice" not in got["list"]["out"]
    assert "Permission denied" in got["list"]["err"] or "cannot" in got["list"]["err"]


def test_lockdown_refuses_a_shared_group_and_non_root(accounts, setup, capsys, monkeypatch):
    service, other = accounts
    subprocess.run(["usermod", "-aG", service, other], check=True, capture_output=True)
    assert cli.main(["lockdown", "--service-user", service]) == 2
    err = capsys.readouterr().err
    assert f"also holds {other}" in err and "--group" in err
    assert cli.main(["lockdown", "--service-user", "no-such-account-cg"]) == 2
    assert "No account named" in capsys.readouterr().err
    # a home that is someone's home directory is refused before anything changes
    _, home = setup
    subprocess.run(["usermod", "-d", str(home), other], check=True, capture_output=True)
    subprocess.run(["gpasswd", "-d", other, service], capture_output=True)
    before = mode_of(home)
    assert cli.main(["lockdown", "--service-user", service]) == 2
    assert "someone's home directory" in capsys.readouterr().err and mode_of(home) == before
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["lockdown", "--service-user", other]) == 2
    assert "run it as root" in capsys.readouterr().err


def test_without_lockdown_a_wal_registry_fails_clearly_for_a_reader(accounts, setup):
    """Item 13 (c) for real: the old WAL registry in a folder the reader cannot write gives
    exit 2 with a message that says what to do, not a crash."""
    service, _ = accounts
    base, home = setup
    os.chmod(home / "registry.key", 0o644)  # what the old README advice did
    os.chmod(home / "identities.db", 0o644)
    for p in home.iterdir():
        if p.name.startswith("identities.db-"):
            p.unlink()
    got = as_user(service, "service", base, home)
    scan = got["scan_public"]
    assert scan["code"] == 2 and "Traceback" not in scan["err"]
    assert "lockdown" in scan["err"] and "identities.db" in scan["err"]
