"""First-run set-up in one call: one admin passphrase that also seals the identity registry,
enforce mode on or off, the admin lock on or off. The ComfyUI panel calls it through
POST /consent_guard/setup (nodes/admin_routes.py); a command line or the A1111 adapter can call
`run_setup` the same way. It never asks anything itself: every answer comes as an argument.

Why one passphrase: the enrol dialog asked for a "registry passphrase" while the lock and the
audit log asked for the admin's. Set-up creates the registry with the admin passphrase (or
re-seals an existing one under it, given its old passphrase), so from then on the one admin
passphrase opens both.

Order, so that a failure halfway leaves a clear state: every check first (nothing written),
then the registry, then the policy (and its approval, expect.py), then admin.json last. The
admin file is what marks "set up": until it exists set-up can simply be run again, and the
error says what was done already (e.g. "the registry is now sealed with the passphrase you
typed"). Once it exists set-up refuses (code "already_set_up"): changes need the admin
passphrase through the panel or `consent-guard admin`. Two set-ups at once: one lock in this
process, and the admin file is claimed with a hard link, which fails rather than replaces.
"""
from __future__ import annotations

import datetime
import getpass
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from . import admin, expect
from .policy import POLICY_FILENAME, PolicyError, load_policy, policy_from_dict
from .registry import LockedError, Registry, RegistryError, registry_paths

log = logging.getLogger("consent_guard")

ENFORCE_HELP = ("Enforce mode checks every image any workflow saves, previews or loads, and "
                "every prompt, not only Consent Guard's own nodes (live previews turn off).")
LOCK_HELP = ("The lock makes every change to the policy, the protected people or the lock "
             "itself need the admin passphrase.")
_lock = threading.Lock()

# Codes the UI tells apart (SetupError.code).
ALREADY_SET_UP = "already_set_up"
PASSPHRASE_MISSING = "passphrase_missing"
PASSPHRASE_MISMATCH = "passphrase_mismatch"
PASSPHRASE_TOO_SHORT = "passphrase_too_short"
REGISTRY_PASSPHRASE_NEEDED = "registry_passphrase_needed"
REGISTRY_PASSPHRASE_WRONG = "registry_passphrase_wrong"
REGISTRY_UNUSABLE = "registry_unusable"
POLICY_INVALID = "policy_invalid"
WRITE_FAILED = "write_failed"


class SetupError(RuntimeError):
    """Set-up refused or stopped; `code` names the case for a UI, `status` the HTTP answer,
    the message says what to do. `done` lists what was written before it stopped."""

    def __init__(self, message: str, code: str, status: int = 400, done=()):
        super().__init__(message)
        self.code, self.status, self.done = code, status, list(done)


@dataclass
class SetupResult:
    home: str
    registry_path: str
    registry: str  # "created", "resealed" (was another passphrase) or "kept" (already this one)
    policy_path: str
    enforce: bool
    locked: bool
    done: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def is_set_up(home: Path) -> bool:
    """Set-up is done once an admin passphrase exists (admin.json), however it was set."""
    return admin.state(home).has_passphrase


def describe(home: Path) -> dict:
    """What a set-up form needs to know (GET /consent_guard/setup): whether set-up is done,
    and whether a registry exists already (its passphrase may be needed). No secrets."""
    st = admin.state(home)
    try:
        policy = load_policy(home=home)
        db = registry_paths(policy, home)[0]
        problem = st.problem
    except Exception as exc:  # a broken policy: set-up will say so too
        db, problem = Path(home) / "identities.db", f"the policy cannot be read: {exc}"
    return {"set_up": st.has_passphrase, "locked": st.locked, "home": str(home),
            "registry_exists": db.exists(), "registry_path": str(db), "problem": problem,
            "min_passphrase": admin.MIN_PASSPHRASE, "enforce_help": ENFORCE_HELP,
            "lock_help": LOCK_HELP}


def with_enforce(text: Optional[str], enforce: bool) -> str:
    """The policy text with its top-level `enforce` set and every other line as it was; with
    no policy file, a short one that holds only this (every other key keeps its default)."""
    value = "true" if enforce else "false"
    if text is None:
        return ("# Consent Guard policy, written by the first-run set-up. Keys not here take\n"
                "# their defaults (`consent-guard policy show` prints them all).\n"
                f"version = 1\nenforce = {value}\n")
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):  # the first table: top-level keys end here
            break
        if re.match(r"enforce\s*=", stripped):
            lines[i] = f"enforce = {value}\n"
            return "".join(lines)
    return f"enforce = {value}\n" + text


def _check_passphrase(passphrase: Optional[str], confirm: Optional[str]) -> None:
    if not passphrase:
        raise SetupError("Type an admin passphrase.", PASSPHRASE_MISSING)
    if len(passphrase) < admin.MIN_PASSPHRASE:
        raise SetupError(f"Use an admin passphrase of at least {admin.MIN_PASSPHRASE} "
                         f"characters.", PASSPHRASE_TOO_SHORT)
    if confirm is None or confirm != passphrase:
        raise SetupError("The two admin passphrases differ: type the same one twice.",
                         PASSPHRASE_MISMATCH)


def _new_policy_text(path: Path, enforce: bool) -> str:
    """The policy file's next text, validated before anything is written."""
    try:
        old = path.read_text(encoding="utf-8") if path.exists() else None
    except OSError as exc:
        raise SetupError(f"The policy {path} cannot be read: {exc}", POLICY_INVALID, 500)
    text = with_enforce(old, enforce)
    try:
        try:
            import tomllib
        except ModuleNotFoundError:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        if policy_from_dict(tomllib.loads(text), str(path)).enforce is not enforce:
            raise PolicyError("enforce could not be set in it")
    except (PolicyError, ValueError) as exc:
        raise SetupError(f"The policy {path} cannot be used, so nothing was set up: {exc}. "
                         f"Fix or remove it, then run set-up again.", POLICY_INVALID)
    return text


def _open_registry(db: Path, passphrase: str, registry_passphrase: Optional[str]):
    """(registry open for writing or None when there is none, what set-up will do with it)."""
    if not db.exists():
        return None, "created"
    try:
        return Registry.open(db, passphrase=passphrase), "kept"
    except LockedError:
        pass
    except RegistryError as exc:
        raise SetupError(f"The identity registry cannot be used: {exc}", REGISTRY_UNUSABLE, 500)
    if not registry_passphrase:
        raise SetupError(
            f"An identity registry already exists at {db}, sealed with another passphrase. "
            f"Type that registry passphrase too: set-up then seals the registry with the admin "
            f"passphrase, so one passphrase does both from now on. If nobody knows it, the "
            f"people in it cannot be read: move the file away (set-up then starts a new "
            f"registry) and enrol them again.", REGISTRY_PASSPHRASE_NEEDED)
    try:
        return Registry.open(db, passphrase=registry_passphrase), "resealed"
    except LockedError:
        raise SetupError(f"The registry passphrase is wrong: it does not open {db}. Nothing "
                         f"was set up.", REGISTRY_PASSPHRASE_WRONG, 403) from None
    except RegistryError as exc:
        raise SetupError(f"The identity registry cannot be used: {exc}", REGISTRY_UNUSABLE, 500)


def run_setup(home: Path, passphrase: Optional[str], confirm: Optional[str], *,
              enforce: bool, locked: bool, registry_passphrase: Optional[str] = None,
              source: str = "setup") -> SetupResult:
    """Do the first-run set-up (see the module doc for the order); raises SetupError."""
    home = Path(home)
    with _lock:
        if is_set_up(home):
            raise SetupError("Consent Guard is set up already: changes need the admin "
                             "passphrase (the Consent Guard panel, or `consent-guard admin`).",
                             ALREADY_SET_UP, 409)
        problem = admin.state(home).problem
        if problem:
            raise SetupError(problem, ALREADY_SET_UP, 409)
        _check_passphrase(passphrase, confirm)
        try:
            policy = load_policy(home=home)
        except Exception as exc:
            raise SetupError(f"The policy cannot be read, so nothing was set up: {exc}. Fix "
                             f"or remove it, then run set-up again.", POLICY_INVALID)
        policy_path = home / POLICY_FILENAME
        text = _new_policy_text(policy_path, enforce)
        db, key_file = registry_paths(policy, home)
        reg, what = _open_registry(db, passphrase, registry_passphrase)
        done: List[str] = []
        try:
            _seal_registry(home, db, key_file, reg, what, passphrase, done)
            _write_policy(home, policy_path, text, done)
            admin.create(home, passphrase, locked)
        except SetupError as exc:
            exc.done = done
            raise
        except (OSError, RegistryError, admin.AdminError, expect.ExpectationError) as exc:
            raise SetupError(_stopped(exc, done), WRITE_FAILED, 500, done) from None
        finally:
            if reg is not None:
                reg.close()
        done.append(f"admin passphrase set ({admin.admin_path(home)}), lock "
                    f"{'on' if locked else 'off'}")
    result = SetupResult(str(home), str(db), what, str(policy_path), enforce, locked, done)
    _audit(home, result, source)
    log.warning("Consent Guard: first-run set-up done (%s): enforce %s, lock %s, registry %s",
                source, "on" if enforce else "off", "on" if locked else "off", what)
    return result


def _seal_registry(home: Path, db: Path, key_file: Path, reg, what: str, passphrase: str,
                   done: List[str]) -> None:
    """Create the registry with the admin passphrase, or re-seal it under it; either way a key
    file lets ComfyUI read it unattended, and the admin's record expects it from now on."""
    if what == "created":
        from .identities import open_admin
        open_admin(db, key_file, passphrase, create=True, home=home).close()
        done.append(f"identity registry created at {db}, sealed with the admin passphrase")
    elif what == "resealed":
        reg.change_passphrase(passphrase)
        done.append(f"identity registry {db} sealed with the admin passphrase (the old "
                    f"registry passphrase no longer opens it)")
    if reg is not None and not key_file.exists():
        reg.write_key_file(key_file)
        done.append(f"registry key file written at {key_file}")
    if expect.read(home).get("registry") is None:
        expect.record_registry(home, db, key_file)


def _write_policy(home: Path, path: Path, text: str, done: List[str]) -> None:
    """Write the policy atomically and approve it (expect.py): in enforce mode only an
    approved policy is used, and this one the admin has just chosen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.setup.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    expect.record_policy(home, path)
    done.append(f"policy {path} written and approved (enforce "
                f"{'on' if 'enforce = true' in text else 'off'})")


def _stopped(exc: Exception, done: List[str]) -> str:
    """The message for a set-up that failed after writing something."""
    message = f"Set-up stopped: {exc}."
    if done:
        message += (" Already done: " + "; ".join(done) + ". Fix the cause and run set-up "
                    "again with the same admin passphrase (the registry now opens with it).")
    else:
        message += " Nothing was changed."
    return message


def _audit(home: Path, result: SetupResult, source: str) -> None:
    """One record in the audit log, kind "admin" (who set up what, never a passphrase).
    Best effort: set-up is done when this runs; a log that cannot be written is logged."""
    try:
        from .audit import audit_for

        log_file = audit_for(load_policy(home=home), home)
        if log_file is None:
            return
        rec = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"),
               "user": _user(), "pid": os.getpid(), "source": source, "client_id": None,
               "kind": "admin", "decision": "allow", "categories": [], "minor": False,
               "reasons": [], "identities": [], "image_sha256": None, "error": None,
               "note": (f"first-run set-up: enforce {'on' if result.enforce else 'off'}, "
                        f"lock {'on' if result.locked else 'off'}, registry "
                        f"{result.registry}")}
        with log_file._lock:  # AuditLog.record takes verdicts only; the same locked append
            log_file._append(rec)
    except Exception as exc:
        log.error("Consent Guard: the set-up was not written to the audit log: %s", exc)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"
