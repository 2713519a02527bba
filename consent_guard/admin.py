"""The admin lock: one passphrase (stored only as a scrypt hash) that, once the lock is on, is
needed to change the policy, the identity registry or the plugin's settings from a UI.

State lives in `<home>/admin.json`: {"version", "kdf": {"n", "r", "p", "salt"}, "hash",
"locked", "changed"}, written owner-only (0600: the scrypt hash must not be copied for offline
guessing; see _mode_and_group for the one exception). The admin's first set-passphrase or lock
also approves the policy as it is then (expect.py, `<home>/expected.json`). Whoever can write
admin.json can remove the lock, which is why a shared machine keeps the Consent Guard home
writable by the admin account only (docs/enforce.md, "Locking down a shared machine");
`consent-guard doctor` reports when it is not. A file that exists but
cannot be read or parsed counts as locked with no way to unlock from a UI (fail closed).
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ADMIN_FILENAME = "admin.json"
MIN_PASSPHRASE = 8
# scrypt at N=2^15, r=8, p=1: ~32 MiB and ~0.1 s per try on a laptop core, OWASP's floor.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1


class AdminError(RuntimeError):
    """A lock operation that cannot be done; the message says why and what to do."""


class AdminLocked(AdminError):
    """The change needs the admin passphrase (the lock is on) and none, or a wrong one, came."""


@dataclass(frozen=True)
class AdminState:
    has_passphrase: bool
    locked: bool
    problem: Optional[str] = None  # set when admin.json exists but cannot be used


def admin_path(home: Path) -> Path:
    return Path(home) / ADMIN_FILENAME


def _kdf(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(passphrase.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * 1024 * 1024, dklen=32)


def _read(home: Path) -> Optional[dict]:
    path = admin_path(home)
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("version") != 1 or "hash" not in data:
        raise ValueError("not a Consent Guard admin file (version 1)")
    return data


def state(home: Path) -> AdminState:
    try:
        data = _read(home)
    except (OSError, ValueError) as exc:
        return AdminState(True, True, f"{admin_path(home)} cannot be read ({exc}); the lock "
                                      f"stays on until the admin repairs or removes it")
    if data is None:
        return AdminState(False, False)
    return AdminState(True, bool(data.get("locked")))


def is_locked(home: Path) -> bool:
    return state(home).locked


def verify(home: Path, passphrase: Optional[str]) -> bool:
    """True when `passphrase` is the admin passphrase (constant-time compare)."""
    if not passphrase:
        return False
    try:
        data = _read(home)
    except (OSError, ValueError):
        return False
    if data is None:
        return False
    try:
        kdf = data["kdf"]
        got = _kdf(passphrase, base64.b64decode(kdf["salt"]), int(kdf["n"]), int(kdf["r"]),
                   int(kdf["p"]))
        return hmac.compare_digest(got, base64.b64decode(data["hash"]))
    except (KeyError, TypeError, ValueError):
        return False


def _mode_and_group(path: Path):
    """(mode, gid) for a rewrite of admin.json: owner-only (0600), so nobody else can copy the
    hash and guess offline. Group read stays only where the admin gave the file to another
    group than their own on purpose (a locked-down machine's ComfyUI group, docs/enforce.md); a file
    once world-readable loses that."""
    try:
        st = path.stat()
    except OSError:
        return 0o600, None
    if hasattr(os, "getgid") and st.st_gid != os.getgid() and st.st_mode & 0o040:
        return 0o640, st.st_gid
    return 0o600, None


def _write(home: Path, data: dict, exclusive: bool = False) -> None:
    """Write admin.json atomically (a temporary file renamed over it). `exclusive`: only if
    there is none yet, even one another process wrote a moment ago (the first set-up): then
    the finished file is hard-linked into place, which fails instead of replacing."""
    path = admin_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode, gid = _mode_and_group(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink()  # O_CREAT keeps an old file's looser mode
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        if gid is not None:
            try:
                os.fchown(f.fileno(), -1, gid)
            except OSError:
                mode = 0o600
        if hasattr(os, "fchmod"):  # POSIX; on Windows the folder's ACL applies
            os.fchmod(f.fileno(), mode)
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if not exclusive:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise AdminError("An admin passphrase was set meanwhile; nothing was changed.") \
            from None
    finally:
        tmp.unlink()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _new_record(passphrase: str, locked: bool) -> dict:
    salt = secrets.token_bytes(16)
    return {"version": 1,
            "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
                    "salt": base64.b64encode(salt).decode()},
            "hash": base64.b64encode(_kdf(passphrase, salt, SCRYPT_N, SCRYPT_R,
                                          SCRYPT_P)).decode(),
            "locked": locked, "changed": _now()}


def create(home: Path, passphrase: str, locked: bool = False) -> None:
    """The first admin passphrase and the lock state, in one write (consent_guard/setup.py):
    refused when an admin passphrase exists, even one set a moment ago by another process.
    Approving the policy is the caller's business (set-up approves the one it wrote)."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise AdminError(f"Use an admin passphrase of at least {MIN_PASSPHRASE} characters.")
    st = state(home)
    if st.problem:
        raise AdminError(st.problem)
    if st.has_passphrase:
        raise AdminError("An admin passphrase is set already; changing it needs the current "
                         "one (`consent-guard admin set-passphrase`).")
    _write(home, _new_record(passphrase, locked), exclusive=True)


def set_passphrase(home: Path, new: str, current: Optional[str] = None) -> None:
    """Set the admin passphrase; changing an existing one needs the current one. The lock
    state is kept."""
    if len(new) < MIN_PASSPHRASE:
        raise AdminError(f"Use an admin passphrase of at least {MIN_PASSPHRASE} characters.")
    st = state(home)
    if st.problem:
        raise AdminError(st.problem)
    if st.has_passphrase and not verify(home, current):
        raise AdminLocked("The current admin passphrase is wrong; nothing was changed.")
    _write(home, _new_record(new, st.locked))
    _record_expectation(home)


def set_locked(home: Path, locked: bool, passphrase: Optional[str]) -> None:
    """Turn the lock on or off; both need the admin passphrase."""
    st = state(home)
    if st.problem:
        raise AdminError(st.problem)
    if not st.has_passphrase:
        raise AdminError("No admin passphrase is set yet: run `consent-guard admin "
                         "set-passphrase` first.")
    if not verify(home, passphrase):
        raise AdminLocked("Wrong admin passphrase; the lock was not changed.")
    data = _read(home)
    data["locked"], data["changed"] = locked, _now()
    _write(home, data)
    _record_expectation(home)


def _record_expectation(home: Path) -> None:
    """The admin's first set-passphrase or lock approves the policy as it is (unless one was
    approved already), so that from then on a missing or swapped policy is refused
    (expect.py). Failing to write it is reported, not fatal: doctor shows it too."""
    from . import expect

    if not expect.record_policy_if_unset(home):
        import logging
        logging.getLogger("consent_guard").warning(
            "Consent Guard: could not record the approved policy in %s",
            expect.expect_path(home))


def require_admin(home: Path, passphrase: Optional[str], what: str) -> None:
    """Raise AdminLocked when the lock is on and `passphrase` is not the admin's. `what` names
    the change refused, for the message."""
    st = state(home)
    if not st.locked:
        return
    if st.problem:
        raise AdminLocked(f"Consent Guard is locked and {st.problem}; {what} was refused.")
    if not verify(home, passphrase):
        raise AdminLocked(f"Consent Guard is locked by the admin: {what} needs the admin "
                          f"passphrase.")
