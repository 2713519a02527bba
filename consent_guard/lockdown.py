"""`consent-guard lockdown`: file ownership and modes so the ComfyUI account can only read.

The model (POSIX; run as root): the admin (root by default) owns everything in the Consent
Guard home and is the only one who can write it. The account that runs ComfyUI (the service
user) reads it through a group that holds nobody else: the folder is admin:group 0750, every
file admin:group 0640, so the registry key and the audit key are readable by those two
accounts only. What ComfyUI must write, the audit log and its lock and head files, is created
here as admin:group 0660 (it appends to them; it cannot create, rename or delete anything in
the folder, so the log is not rotated under lockdown: rotate it as the admin).

The registry is switched from SQLite's WAL journal to a rollback journal first: a WAL reader
needs to create "-shm"/"-wal" files beside the registry, which a read-only account cannot.

Why a group and not `chmod 644`: with 644 any local account reads registry.key, and with it
every enrolled name. Why refuse a shared group: its other members would read the key too.
Windows has no owner/group modes: there the icacls steps in docs/enforce.md apply.
"""
from __future__ import annotations

import os
import sqlite3
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from .audit import AuditLog, audit_path
from .registry import registry_paths, use_rollback_journal

DIR_MODE, FILE_MODE, SHARED_WRITE_MODE = 0o750, 0o640, 0o660


class LockdownError(RuntimeError):
    """The lock-down cannot be applied as asked; the message says why and what to do."""


@dataclass
class Accounts:
    admin_uid: int
    group_gid: int
    service_user: str
    group_name: str


@dataclass
class Report:
    done: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def resolve_accounts(service_user: str, group: Optional[str] = None,
                     admin_user: str = "root") -> Accounts:
    """The admin's uid and the group that lets `service_user` read; refuses a group that has
    other members (they would read the keys too)."""
    import grp
    import pwd

    try:
        svc = pwd.getpwnam(service_user)
    except KeyError:
        raise LockdownError(f"No account named {service_user!r}: give the account ComfyUI "
                            f"runs as (--service-user).") from None
    try:
        admin = pwd.getpwnam(admin_user)
    except KeyError:
        raise LockdownError(f"No account named {admin_user!r} (--admin-user).") from None
    if admin.pw_uid == svc.pw_uid:
        raise LockdownError("The admin and the ComfyUI account are the same account: the "
                            "lock-down needs ComfyUI to run under its own account.")
    try:
        gr = grp.getgrnam(group) if group else grp.getgrgid(svc.pw_gid)
    except KeyError:
        raise LockdownError(f"No group named {group!r}: create it (`groupadd {group}`) and add "
                            f"{service_user} to it.") from None
    _check_group(gr, svc, admin)
    return Accounts(admin.pw_uid, gr.gr_gid, service_user, gr.gr_name)


def _check_group(gr, svc, admin) -> None:
    """The group must hold the service user and nobody but the admin."""
    import pwd

    members = set(gr.gr_mem) | {p.pw_name for p in pwd.getpwall() if p.pw_gid == gr.gr_gid}
    if svc.pw_name not in members:
        raise LockdownError(f"{svc.pw_name} is not in the group {gr.gr_name}: "
                            f"`usermod -aG {gr.gr_name} {svc.pw_name}`, then run this again.")
    others = sorted(members - {svc.pw_name, admin.pw_name})
    if others:
        raise LockdownError(
            f"The group {gr.gr_name} also holds {', '.join(others)}, who would then read the "
            f"registry key. Make a group for ComfyUI alone (`groupadd consent-guard && usermod "
            f"-aG consent-guard {svc.pw_name}`) and pass --group consent-guard.")


def switch_registry_journal(db: Path) -> str:
    """Put the registry in rollback-journal mode (a reader then needs no write access)."""
    if not db.is_file():
        return "absent"
    conn = sqlite3.connect(str(db), timeout=5, isolation_level=None)
    try:
        mode = use_rollback_journal(conn)
    except sqlite3.DatabaseError as exc:
        raise LockdownError(f"Cannot switch the registry {db} to a rollback journal: {exc}") \
            from None
    finally:
        conn.close()
    if mode != "delete":
        raise LockdownError(f"The registry {db} stays in {mode} mode: another process (ComfyUI?) "
                            f"has it open. Stop ComfyUI and run the lock-down again.")
    return mode


def apply(home: Path, policy, accounts: Accounts) -> Report:
    """Own and restrict the home, the registry, its key and the audit files (see module doc)."""
    if sys.platform == "win32":  # pragma: no cover - Windows has ACLs instead
        raise LockdownError("Windows keeps rights in ACLs: use the icacls steps in docs/enforce.md.")
    if os.geteuid() != 0:
        raise LockdownError("The lock-down changes file owners: run it as root (sudo).")
    home = Path(home)
    if not home.is_dir():
        raise LockdownError(f"No Consent Guard home at {home} (`consent-guard where` says "
                            f"why this folder): give --comfyui DIR or set CONSENT_GUARD_HOME, "
                            f"or create the policy first (`consent-guard policy init`).")
    _refuse_foreign_home(home)
    report = Report()
    db, key = registry_paths(policy, home)
    report.done.append(f"registry journal: {switch_registry_journal(db)}")
    log = AuditLog(audit_path(policy, home)) if policy.audit_enabled else None
    shared = _prepare_audit(log, report) if log is not None else set()
    from .provenance import machine_key  # made now, so locking gives the UI's account read
    machine_key(home)  # access; that account could not create it in a locked folder
    _lock_folder(home, accounts, shared, report)
    outside = [p for p in (db, key) if p.exists()]  # a policy may keep them elsewhere
    if log is not None:
        outside += [p for p in [log.key_path, *shared] if p.exists()]
    for path in outside:
        if home not in path.parents:
            _own(path, accounts, SHARED_WRITE_MODE if path in shared else FILE_MODE, report)
    for folder in sorted({home.parent, *(p.parent for p in outside)}):
        if folder != home and home not in folder.parents and _service_can_write(folder,
                                                                                accounts):
            report.notes.append(f"WARNING: {accounts.service_user} can write {folder}, so it "
                                f"can replace what is in it: make it the admin's alone")
    if not key.exists() and db.exists():
        report.notes.append(f"no key file at {key}: ComfyUI cannot read the registry "
                            f"unattended; `consent-guard identity key-file`, then run the "
                            f"lock-down again")
    report.notes.append("run the lock-down again after `identity key-file`, `identity init` "
                        "or `admin set-passphrase`: files they create are the admin's alone")
    return report


def _refuse_foreign_home(home: Path) -> None:
    """Everything under the home gets new owners: refuse a folder that is plainly not only
    Consent Guard's (a filesystem root, someone's home directory, a large tree)."""
    import pwd

    resolved = home.resolve()
    homes = {Path(p.pw_dir).resolve() for p in pwd.getpwall() if p.pw_dir}
    if resolved == Path(resolved.anchor) or resolved in homes:
        raise LockdownError(f"{home} is not a folder of Consent Guard's own (it is a root or "
                            f"someone's home directory): set CONSENT_GUARD_HOME to a folder "
                            f"that holds only Consent Guard's files, e.g. /etc/consent-guard.")
    count = sum(len(files) + len(dirs) for _, dirs, files in os.walk(home))
    if count > 1000:
        raise LockdownError(f"{home} holds {count} entries: it does not look like a Consent "
                            f"Guard home; point CONSENT_GUARD_HOME at one.")


def _service_can_write(folder: Path, accounts: Accounts) -> bool:
    """Whether the service user could create, rename or delete entries in `folder`."""
    import pwd

    svc = pwd.getpwnam(accounts.service_user)
    st = os.stat(folder)
    groups = set(os.getgrouplist(svc.pw_name, svc.pw_gid))
    if st.st_uid == svc.pw_uid:
        return True
    if st.st_mode & stat.S_ISVTX:  # sticky (/tmp): others' entries cannot be renamed
        return False
    return bool(st.st_mode & 0o002) or (bool(st.st_mode & 0o020) and st.st_gid in groups)


def _prepare_audit(log: AuditLog, report: Report) -> set:
    """Create the files ComfyUI appends to (log, lock, head) and the MAC key, so it never needs
    to create anything in a folder it cannot write. Returns the paths it may write."""
    log.path.parent.mkdir(parents=True, exist_ok=True)
    log.ensure_key()
    writable = {log.path, log.lock_path, log.head_path}
    for path in writable:
        if not path.exists():
            os.close(os.open(str(path), os.O_WRONLY | os.O_CREAT, 0o600))
            report.done.append(f"created {path}")
    return writable


def _lock_folder(folder: Path, accounts: Accounts, shared: set, report: Report) -> None:
    """The folder and everything under it: admin:group, folders 0750, files 0640, the files
    ComfyUI appends to 0660. Symbolic links are reported, never followed."""
    if not folder.is_dir():
        return
    _own(folder, accounts, DIR_MODE, report)
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(root) / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                report.notes.append(f"{path} is a symbolic link: not changed; check what it "
                                    f"points to, or replace it with the file itself")
            elif stat.S_ISDIR(st.st_mode):
                _own(path, accounts, DIR_MODE, report)
            else:
                _own(path, accounts, SHARED_WRITE_MODE if path in shared else FILE_MODE,
                     report)


def _own(path: Path, accounts: Accounts, mode: int, report: Report) -> None:
    st = os.lstat(path)
    if (st.st_uid, st.st_gid) != (accounts.admin_uid, accounts.group_gid):
        os.chown(path, accounts.admin_uid, accounts.group_gid, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
    report.done.append(f"{oct(mode)[2:]:>4} {accounts.group_name:<12} {path}")


__all__ = ["Accounts", "LockdownError", "Report", "apply", "resolve_accounts",
           "switch_registry_journal"]
