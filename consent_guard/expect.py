"""What the admin expects Consent Guard to run with, kept apart from the files themselves, so
that a policy or registry that existed cannot silently become "none" when its file is moved
away, and a policy cannot be swapped behind the admin's back in enforce mode.

State lives in `<home>/expected.json`:
    {"version": 1,
     "policy":   {"path", "sha256" (null: approved to run without a policy file), "enforce",
                  "approved"},
     "registry": {"path", "key_file", "recorded"}}
It holds no secret (a file hash and paths), so the ComfyUI account can read it while only the
admin can write it in a locked-down home (docs/enforce.md; `consent-guard doctor` checks who can write).

Who writes it: the admin's commands (`consent-guard admin approve-policy`, and the first
`set-passphrase` / `lock`), the ComfyUI policy editor once the admin passphrase was accepted,
and whoever creates or first opens a registry, so the user who never set an admin passphrase
is covered too. Who reads it: everything that builds an engine (ComfyUI's get_engine, the
command line's scan through open_registry, prestartup_script.py at boot, doctor). They refuse,
with a message saying what to do, when
- a recorded registry is missing, or the policy now names another registry, or a registry key
  file lies there without its registry (a registry existed),
- the recorded policy file is missing, or its sha256 differs from the approved one while either
  the approved or the current policy asks for enforce mode (outside enforce mode a changed
  policy is only reported: nothing the user could loosen was promised to anyone),
- expected.json exists but cannot be read (fail closed).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import List, Optional, Tuple

from .policy import POLICY_FILENAME
from .registry import RegistryError

EXPECT_FILENAME = "expected.json"
APPROVE_COMMAND = "consent-guard admin approve-policy"
FORGET_COMMAND = "consent-guard admin forget-registry"
_write_lock = threading.Lock()


class ExpectationError(RegistryError):
    """A file the admin's record expects is missing or changed; the message says what to do.
    A RegistryError, so the command line answers it as it answers an unusable registry (a
    clear message, exit 2)."""


def expect_path(home: Path) -> Path:
    return Path(home) / EXPECT_FILENAME


def sha256_of(path: Path) -> Optional[str]:
    """The file's sha256 (hex), or None when there is no such file."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def read(home: Path) -> dict:
    """The record ({} when there is none). One that exists but cannot be read raises: a
    checker cannot tell what was expected, so it refuses."""
    path = expect_path(home)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ExpectationError(f"the admin's record {path} cannot be read ({exc}); repair it, "
                               f"or the admin runs `{APPROVE_COMMAND}` to write it again") from None
    if not isinstance(data, dict) or data.get("version") != 1:
        raise ExpectationError(f"{path} is not a Consent Guard record (version 1); the admin "
                               f"runs `{APPROVE_COMMAND}` to write it again")
    return data


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _same(a, b) -> bool:
    return Path(a).expanduser().resolve(strict=False) == Path(b).expanduser().resolve(strict=False)


def _update(home: Path, section: str, value: Optional[dict]) -> None:
    """Replace one section of the record (atomically: a reader sees the old or the new)."""
    path = expect_path(home)
    with _write_lock:
        try:
            data = read(home)
        except ExpectationError:
            data = {}  # the admin is writing it again
        data["version"] = 1
        if value is None:
            data.pop(section, None)
        else:
            data[section] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        # readable by the ComfyUI account whatever the admin's umask (it holds no secret); in
        # a locked-down home the folder (0750, admin:group) is what keeps others out
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)


def enforce_of(path: Path) -> bool:
    """The file's `enforce`, read as the prestartup guard reads it: a file that cannot be read
    or whose value is not a boolean counts as enforce (fail closed); no file is off."""
    if not Path(path).exists():
        return False
    try:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        value = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("enforce", False)
    except Exception:
        return True
    return value if isinstance(value, bool) else True


def record_policy(home: Path, path: Optional[Path] = None) -> Optional[str]:
    """Approve the policy file as it is now (its sha256, or its absence). Returns the hash."""
    path = Path(path) if path is not None else Path(home) / POLICY_FILENAME
    digest = sha256_of(path)
    _update(home, "policy", {"path": str(path), "sha256": digest,
                             "enforce": enforce_of(path), "approved": _now()})
    return digest


def record_policy_if_unset(home: Path) -> bool:
    """Record the policy unless a record exists (the admin's first set-passphrase or lock):
    a later change still needs an explicit approve. False when it could not be written."""
    try:
        if "policy" in read(home):
            return True
        record_policy(home)
        return True
    except (OSError, ExpectationError):
        return False


def record_registry(home: Path, db: Path, key_file: Path) -> None:
    """Remember that a registry exists here: from now on its absence refuses, not allows."""
    _update(home, "registry", {"path": str(db), "key_file": str(key_file), "recorded": _now()})


def note_registry(home: Path, db: Path, key_file: Path) -> bool:
    """Record a registry seen open when none is recorded (a registry made by a tool that does
    not record it). Best effort: False when the record cannot be written (e.g. the ComfyUI
    account in a locked-down home, where the admin's own commands wrote it)."""
    try:
        if read(home).get("registry") is None and Path(db).exists():
            record_registry(home, db, key_file)
        return True
    except (OSError, ExpectationError):
        return False


def forget_registry(home: Path) -> None:
    """The admin removed the registry on purpose: nobody is expected to be protected."""
    _update(home, "registry", None)


def registry_problems(home: Path, db: Path, key_file: Path, record: dict) -> List[str]:
    """Why the registry at `db` is not the one the admin expects (empty when it is)."""
    out = []
    rec = record.get("registry")
    if rec:
        expected = Path(rec.get("path", ""))
        if not _same(expected, db):
            out.append(f"the policy names the identity registry {db}, but the admin's registry "
                       f"is {expected} ({expect_path(home)})")
        elif not Path(db).exists():
            out.append(f"the identity registry {db} is missing, but the admin's record "
                       f"({expect_path(home)}) says it exists; restore it, or if it was "
                       f"removed on purpose the admin runs `{FORGET_COMMAND}`")
    if not out and not Path(db).exists() and Path(key_file).exists():
        out.append(f"the registry key file {key_file} is there but the identity registry {db} "
                   f"is missing, so a registry existed; restore it, or if it was removed on "
                   f"purpose delete the key file")
    return out


def policy_problems(home: Path, path: Path, record: dict) -> Tuple[List[str], List[str]]:
    """(refusals, notes) for the policy file at `path` against the admin's approval."""
    rec = record.get("policy")
    if not rec or not _same(rec.get("path", ""), path):
        return [], []
    approved, now = rec.get("sha256"), sha256_of(path)
    if approved == now:
        return [], []
    if now is None:
        return [f"the policy {path} is missing, but the admin approved one ({expect_path(home)}); "
                f"restore it, or the admin runs `{APPROVE_COMMAND}` to run without one"], []
    message = (f"the policy {path} has changed since the admin approved it (sha256 "
               f"{now[:12]}..., approved {str(approved)[:12]}...)")
    if rec.get("enforce") or enforce_of(path):
        return [message + f"; in enforce mode only an approved policy is used: the admin "
                          f"checks it and runs `{APPROVE_COMMAND}`"], []
    return [], [message + "; enforce mode is off, so it is used"]


def problems(home: Path, policy, db: Path, key_file: Path) -> Tuple[List[str], List[str]]:
    """(refusals, notes) for an engine about to run with `policy` and the registry at `db`.
    The policy is compared only when it is the home's own file (or the defaults in its place):
    `scan --policy FILE` runs a file the person chose, but never without the registry."""
    try:
        record = read(home)
    except ExpectationError as exc:
        return [str(exc)], []
    refusals = registry_problems(home, db, key_file, record)
    home_policy = Path(home) / POLICY_FILENAME
    notes: List[str] = []
    if policy.source is None or _same(policy.source, home_policy):
        more, notes = policy_problems(home, home_policy, record)
        refusals += more
    return refusals, notes


def require(home: Path, policy, db: Path, key_file: Path) -> List[str]:
    """Raise ExpectationError when the admin's record refuses; returns the notes to log."""
    refusals, notes = problems(home, policy, db, key_file)
    if refusals:
        raise ExpectationError("Consent Guard refuses to check with what it finds, so nothing "
                               "passes: " + "; ".join(refusals))
    return notes


def open_registry(policy, home: Path, passphrase: Optional[str] = None):
    """The registry a checker reads (registry.open_for_matching), after the admin's record
    agreed; a registry opened here for the first time is recorded. For the command line and
    every other engine builder: None only when no registry is expected and none exists."""
    from .registry import open_for_matching, registry_paths

    db, key_file = registry_paths(policy, home)
    require(home, policy, db, key_file)
    registry = open_for_matching(policy, home, passphrase)
    if registry is not None:
        note_registry(home, db, key_file)
    return registry
