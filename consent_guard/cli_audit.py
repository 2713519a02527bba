"""`consent-guard audit`: read the audit log (filters, JSON) and verify its hash chain, the
records' MACs and the head that anchors both ends (see consent_guard/audit.py, "Anchoring").
audit.py is imported when the command runs, not with the CLI (a fast --help)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .home import home_of

EXIT_OK, EXIT_ERROR = 0, 2


def cmd_audit(args) -> int:
    from .audit import audit_path as _audit_path
    from .audit import log_files, parse_when, read_records
    from .policy import load_policy

    home = home_of(args)
    policy = load_policy(Path(args.policy) if args.policy else None, home=home)
    path = _audit_path(policy, home)
    since = None
    if args.since:
        try:
            since = parse_when(args.since)
        except ValueError as exc:
            print(f"consent-guard audit: --since {exc}", file=sys.stderr)
            return EXIT_ERROR
    if not policy.audit_enabled:
        print(f"note: audit logging is off ([audit] enabled = false in "
              f"{policy.source or 'the policy'}); new decisions are not recorded.",
              file=sys.stderr)
    files = log_files(path)
    if args.verify:
        return _verify(path, files, policy.audit_enabled)
    if not files:
        if policy.audit_enabled:
            print(f"No audit log at {path}: nothing has been recorded yet.", file=sys.stderr)
        return EXIT_OK
    records = read_records(path, since=since, decision=args.decision, kind=args.kind)
    shown = 0
    for rec in records:
        shown += 1
        if args.json:
            print(json.dumps(rec, ensure_ascii=False, separators=(",", ":")))
        else:
            print(_human(rec))
    if records.skipped:
        where = ", ".join(f"{f}:{n}" for f, n in records.skipped[:5])
        more = f" and {len(records.skipped) - 5} more" if len(records.skipped) > 5 else ""
        print(f"note: skipped {len(records.skipped)} line(s) that are not records: "
              f"{where}{more} (`consent-guard audit --verify` checks the chain)",
              file=sys.stderr)
    if not shown and not args.json:
        print("no records match", file=sys.stderr)
    return EXIT_OK


def _verify(path: Path, files: list, enabled: bool) -> int:
    """Print each problem (stdout) and note (stderr); exit 2 when there is any problem. A
    missing log is a problem only when the head says records were written."""
    from .audit import verify_log

    result = verify_log(path)
    if not files and not result.problems:
        if enabled:
            print(f"No audit log at {path}: nothing has been recorded yet.", file=sys.stderr)
        return EXIT_OK
    for p in result.problems:
        print(p)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.problems:
        print(f"audit log {path}: {len(result.problems)} problem(s): the log was edited, cut "
              f"or damaged, or cannot be checked.", file=sys.stderr)
        return EXIT_ERROR
    anchored = "anchored" if not result.notes else "chain intact, partly unanchored"
    print(f"audit log {path}: intact ({anchored}; {len(files)} file(s))")
    return EXIT_OK


def _human(rec: dict) -> str:
    cats = ",".join(rec.get("categories") or []) or "-"
    ids = ",".join(rec.get("identities") or [])
    line = (f"{rec.get('time', '?')}  {rec.get('user', '?')}  {rec.get('kind', '?'):11}  "
            f"{rec.get('decision', '?'):6}  {cats}")
    if ids:
        line += f"  identities={ids}"
    if rec.get("error"):
        line += f"  error: {rec['error']}"
    return line


def add_parser(sub) -> None:
    p = sub.add_parser("audit", help="show the audit log of decisions, or verify its chain")
    p.add_argument("--since", metavar="WHEN",
                   help="only records from WHEN on: an ISO date or time (2025-01-31, "
                        "2025-01-31T18:00, local time unless it ends in Z), or a span ago: "
                        "30m, 12h, 7d, 2w")
    p.add_argument("--decision", choices=["allow", "censor", "block"])
    p.add_argument("--kind", choices=["image", "input_image", "prompt"])
    p.add_argument("--json", action="store_true", help="each record as stored (one JSON line)")
    p.add_argument("--verify", action="store_true",
                   help="check the hash chain, the records' MACs and the head (exit 2 when a "
                        "line was edited, or lines removed anywhere, the tail included)")
    p.add_argument("--policy", metavar="FILE", help="policy TOML whose [audit] path to read")
    p.set_defaults(func=cmd_audit)


__all__ = ["add_parser", "cmd_audit"]
