"""`consent-guard verify FILE...`: is the invisible mark there, is the signed verdict intact,
was it signed on this machine, and (with the admin passphrase) which audit record it points to.
See consent_guard/provenance.py and docs/provenance.md. Heavy modules load when it runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from .home import home_of

EXIT_OK, EXIT_UNPROVEN, EXIT_ERROR = 0, 1, 2


def cmd_verify(args) -> int:
    from . import provenance

    home = home_of(args)
    if args.make_key:
        return _make_key(home)
    if not args.paths:
        print("consent-guard verify: give one or more image files or folders", file=sys.stderr)
        return EXIT_ERROR
    from .cli import _expand, missing_paths, report_missing

    missing = missing_paths(args.paths)
    if missing:
        return report_missing("verify", missing)
    audit_file = _audit_file_for_records(args, home) if args.record else None
    if args.record and audit_file is None:
        return EXIT_ERROR
    marker = _marker(args, home)
    status = EXIT_OK
    for path, _, problem in _expand(args.paths):
        if problem:
            check = provenance.FileCheck(str(path), error=problem)
        else:
            check = provenance.verify_file(path, home=home, marker=marker)
            if audit_file is not None:
                check.record = provenance.record_for(check, audit_file)
        status = max(status, _status_of(check))
        print(json.dumps(check.to_dict()) if args.json else _human(check), flush=True)
    return status


def _marker(args, home: Path):
    """The mark reader for the policy's model paths (and --models-dir)."""
    from .policy import load_policy
    from .provenance import marker_for

    policy = load_policy(Path(args.policy) if args.policy else None, home=home)
    dirs = [Path(args.models_dir) / "consent_guard"] if args.models_dir else []
    return marker_for(policy, dirs)


def _status_of(check) -> int:
    if check.error:
        return EXIT_ERROR
    signed = check.signature is not None and check.signature.status == "valid"
    marked = bool(check.watermark and check.watermark.get("found"))
    if check.signature is not None and check.signature.status == "invalid":
        return EXIT_UNPROVEN
    return EXIT_OK if signed or marked else EXIT_UNPROVEN


def _make_key(home: Path) -> int:
    from .provenance import ProvenanceError, fingerprint, key_path, machine_key, public_bytes

    try:
        key = machine_key(home)
    except ProvenanceError as exc:
        print(f"consent-guard verify: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"provenance key {key_path(home)}: {fingerprint(public_bytes(key))}")
    return EXIT_OK


def _audit_file_for_records(args, home: Path) -> Optional[Path]:
    """The audit log to look records up in, once the admin passphrase checks out."""
    from . import admin
    from .audit import audit_path
    from .cli_admin import _ask
    from .policy import load_policy

    if not admin.state(home).has_passphrase:
        print("consent-guard verify: --record needs the admin passphrase, and none is set: "
              "`consent-guard admin set-passphrase` first", file=sys.stderr)
        return None
    try:
        ok = admin.verify(home, _ask(args, "Admin passphrase: "))
    except admin.AdminError as exc:
        print(f"consent-guard verify: {exc}", file=sys.stderr)
        return None
    if not ok:
        print("consent-guard verify: wrong admin passphrase: no audit record shown",
              file=sys.stderr)
        return None
    return audit_path(load_policy(Path(args.policy) if args.policy else None, home=home), home)


def _human(check) -> str:
    if check.error:
        return f"error   {check.path}  {check.error}"
    parts = [_mark_words(check.watermark, check.notes), _signature_words(check.signature)]
    if check.record is not None:
        recs = check.record.get("records") or []
        parts.append("record: " + (", ".join(f"#{r.get('seq')} {r.get('time')} "
                                             f"{r.get('decision')}" for r in recs)
                                   if recs else "none (" + check.record.get(
                                       "why", "not in the audit log") + ")"))
    return f"{check.path}\n  " + "\n  ".join(parts)


def _mark_words(mark: Optional[dict], notes) -> str:
    if mark is None:
        return "mark: not read (" + "; ".join(notes) + ")"
    words = "found" if mark["found"] else "not found"
    detail = f"{mark['tag_bits_matching']} tag bits, bit confidence {mark['bit_confidence']}"
    if mark["found"]:
        detail += f", payload {mark['payload']}, id {mark['mark_id']}"
    return f"mark: {words} ({detail})"


def _signature_words(sig) -> str:
    if sig is None:
        return "signature: not checked"
    if sig.status != "valid":
        return f"signature: {sig.status} ({sig.problem})"
    who = {True: "this machine's key", False: "another machine's key (self-signed)",
           None: "key not compared"}[sig.this_machine]
    claim = sig.claim or {}
    return (f"signature: valid, {who} {sig.key}; verdict {claim.get('verdict', {}).get('decision')}"
            f", audit record {claim.get('audit_record')}, signed {claim.get('time')}")


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check the invisible mark and the signed verdict of "
                                      "saved images (and, as admin, their audit record)")
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.add_argument("--record", action="store_true",
                   help="also show the audit record the image points to (needs the admin "
                        "passphrase: --passphrase-file or $CONSENT_GUARD_ADMIN_PASSPHRASE)")
    p.add_argument("--passphrase-file", metavar="FILE", help="file holding the admin passphrase")
    p.add_argument("--make-key", action="store_true",
                   help="create this machine's signing key now (before `lockdown`) and show "
                        "its fingerprint")
    p.add_argument("--policy", metavar="FILE", help="policy TOML (model paths)")
    p.add_argument("--models-dir", metavar="DIR", help="ComfyUI's models folder")
    p.set_defaults(func=cmd_verify)


__all__ = ["add_parser", "cmd_verify"]
