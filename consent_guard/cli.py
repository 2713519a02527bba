"""The `consent-guard` command line (also `python -m consent_guard`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import sqlite3
import stat
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from . import __version__, cli_admin, cli_audit, cli_identity, expect
from .engine import Engine
from .home import resolve_home
from .models import ModelError, ModelResolver, describe
from .policy import DEFAULT_POLICY_TOML, POLICY_FILENAME, PolicyError, load_policy
from .registry import RegistryError
from .verdict import Decision, Verdict

# Files with these suffixes are always checked (a decoding failure is an error result); other
# files are checked when their first bytes say they are an image (see _sniff).
IMAGE_SUFFIXES = {".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".pjpeg", ".pjp", ".webp",
                  ".gif", ".bmp", ".dib", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl",
                  ".ico", ".qoi", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".psd"}
# Magic bytes at offset 0 (and a second test at 8 for RIFF and ISO boxes).
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
          b"MM\x00*", b"8BPS", b"qoif", b"\xff\x0a", b"\x00\x00\x00\x0cJXL ",
          b"\x00\x00\x01\x00", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")
_BOX_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1", b"heim", b"heis")
EXIT_ALLOWED, EXIT_FLAGGED, EXIT_ERROR = 0, 1, 2
Scanned = Tuple[Path, bool, Optional[str]]  # (path, came from a folder, why it cannot be checked)


def _expand(paths: List[str]) -> Iterator[Scanned]:
    """Files as given; folders walked for images. Whatever in a folder cannot be checked (a
    subfolder that cannot be listed, a file that cannot be read, a broken link, a device or
    pipe) is yielded with the reason, so the scan reports it and exits 2 instead of skipping
    it. Symbolic links to folders are followed, each folder once (a link loop ends there)."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            yield from _walk(path)
        else:
            yield path, False, None


def _walk(top: Path) -> Iterator[Scanned]:
    """Depth first, names sorted; `seen` (device, inode) stops link loops and repeats."""
    seen = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue  # reached again through a link: its files are checked once
            seen.add(key)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield folder, True, f"folder cannot be read ({exc.strerror or exc}): its images " \
                                f"are not checked"
            continue
        subfolders = []
        for entry in entries:
            kind, problem = _classify(Path(entry.path))
            if kind == "folder":
                subfolders.append(Path(entry.path))
            elif kind == "image" or problem:
                yield Path(entry.path), True, problem
        stack.extend(reversed(subfolders))


def _classify(path: Path) -> Tuple[str, Optional[str]]:
    """("folder" | "image" | "other", why it cannot be checked or None), links followed."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if os.path.islink(path):
            return "other", f"broken symbolic link ({exc.strerror or exc}): not checked"
        return "other", f"cannot be read ({exc.strerror or exc}): not checked"
    if stat.S_ISDIR(st.st_mode):
        return "folder", None
    if not stat.S_ISREG(st.st_mode):
        return "other", "not a regular file (a device, pipe or socket): not checked"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image", None
    try:
        with open(path, "rb") as fp:
            head = fp.read(32)
    except OSError as exc:
        return "other", f"cannot be read ({exc.strerror or exc}), so whether it is an image " \
                        f"is unknown: not checked"
    return ("image" if _sniff(head) else "other"), None


def _sniff(head: bytes) -> bool:
    """Whether a file's first bytes are those of an image format, whatever its name."""
    if head.startswith(_MAGIC):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return head[4:8] == b"ftyp" and head[8:12] in _BOX_BRANDS


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with requirements.txt
        return items
    return tqdm(items, desc="scanning", unit="img", file=sys.stderr, leave=False)


def cmd_scan(args) -> int:
    policy = load_policy(Path(args.policy) if args.policy else None, home=resolve_home())
    # None when nobody is enrolled; a registry that exists but cannot be read (no key, no
    # permission, a damaged row) raises RegistryError: exit 2, nothing reported as allowed
    registry = expect.open_registry(policy, resolve_home())  # and the admin's record holds
    models = Path(args.models_dir) if args.models_dir else None
    engine = Engine(policy, registry=registry,
                    model_dirs=[models / "consent_guard"] if models else [],
                    insightface_dirs=[models / "insightface"] if models else [])
    files = list(_expand(args.paths))
    if not files:
        print("consent-guard: no images found in " + " ".join(args.paths), file=sys.stderr)
        return EXIT_ERROR
    show_bar = any(from_dir for _, from_dir, _ in files) and sys.stderr.isatty() \
        and not args.quiet
    status = EXIT_ALLOWED
    for path, _, problem in _progress(files, show_bar):
        verdict = Verdict.failed(problem) if problem else engine.check_file(path)
        if verdict.error:
            status = EXIT_ERROR
        elif verdict.decision is not Decision.ALLOW and status == EXIT_ALLOWED:
            status = EXIT_FLAGGED
        record = {"path": str(path), **verdict.to_dict()}
        if args.json:
            line = json.dumps(record)
        else:
            detail = verdict.error or ("; ".join(
                f"{r.label} {r.score:.2f}" for r in verdict.reasons) or "-")
            line = f"{verdict.decision.value:6}  {path}  {detail}"
        print(line, flush=True)
    return status


def cmd_check_prompt(args) -> int:
    from .prompts.check import prompt_record

    policy = load_policy(Path(args.policy) if args.policy else None, home=resolve_home())
    engine = Engine(policy, registry=expect.open_registry(policy, resolve_home()))
    texts = args.texts if args.texts else (line.rstrip("\r\n") for line in sys.stdin)
    status = EXIT_ALLOWED
    for text in texts:
        if not args.texts and not text.strip():
            continue
        verdict = engine.check_prompt(text, negative=args.negative)
        if verdict.error:
            status = EXIT_ERROR
        elif verdict.decision is not Decision.ALLOW and status == EXIT_ALLOWED:
            status = EXIT_FLAGGED
        record = prompt_record(text, verdict)
        if verdict.error:
            record["error"] = verdict.error
        if args.json:
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            why = ", ".join(record["categories"]) or "-"
            matched = f" [{', '.join(record['matched'])}]" if record["matched"] else ""
            print(f"{record['decision']:6}  {why}{matched}  {text}", flush=True)
    return status


def cmd_policy(args) -> int:
    home = resolve_home()
    target = home / POLICY_FILENAME
    if args.action == "path":
        print(target)
    elif args.action == "init":
        if target.exists() and not args.force:
            print(f"{target} exists; use --force to overwrite it.", file=sys.stderr)
            return EXIT_ERROR
        from . import admin
        if admin.is_locked(home):
            try:
                admin.require_admin(home, cli_admin._ask(args, "Admin passphrase: "),
                                    "replacing the policy")
            except admin.AdminError as exc:
                print(f"consent-guard: {exc}", file=sys.stderr)
                return EXIT_ERROR
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(DEFAULT_POLICY_TOML, encoding="utf-8")
        print(f"wrote the default policy to {target}")
        if not admin.state(home).has_passphrase or admin.is_locked(home):
            expect.record_policy(home, target)  # no admin yet, or the admin just said so
        else:
            print("run `consent-guard policy approve` (admin passphrase) to approve it",
                  file=sys.stderr)
    elif args.action == "approve":
        try:
            return cli_admin._approve_policy(args, home)
        except Exception as exc:  # AdminError, AdminLocked: wrong or missing passphrase
            print(f"consent-guard: {exc}", file=sys.stderr)
            return EXIT_ERROR
    elif args.action == "check":
        policy = load_policy(Path(args.file) if args.file else None, home=home)
        print(f"policy OK: {policy.source or 'built-in defaults (no ' + str(target) + ')'}")
    elif args.action == "show":
        policy = load_policy(Path(args.file) if args.file else None, home=home)
        print(json.dumps({
            "source": policy.source, "actions": {k: v.value for k, v in policy.actions.items()},
            "censor": {"style": policy.censor_style, "margin": policy.censor_margin},
            "explicit": {"nudenet_min_score": policy.nudenet_min_score,
                         "open_nsfw_safe_below": policy.open_nsfw_safe_below,
                         "open_nsfw_explicit_at": policy.open_nsfw_explicit_at,
                         "region_context": policy.region_context},
            "models": {"device": policy.device, "paths": dict(policy.model_paths)},
            "limits": {"max_pixels": policy.max_pixels}}, indent=2))
    return EXIT_ALLOWED


def cmd_models(args) -> int:
    policy = load_policy(Path(args.policy) if args.policy else None, home=resolve_home())
    resolver = ModelResolver(policy.model_paths)
    rows = describe(resolver, sorted(resolver.manifest))
    for row in rows:
        print(f"{'ok ' if row['ok'] else 'BAD'} {row['name']}: {row.get('file') or row['error']}")
    return EXIT_ALLOWED if all(r["ok"] for r in rows) else EXIT_ERROR


def cmd_lockdown(args) -> int:
    """Apply lockdown.py's ownership and modes to the home (see its module doc)."""
    from . import lockdown

    home = resolve_home()
    policy = load_policy(Path(args.policy) if args.policy else None, home=home)
    try:
        accounts = lockdown.resolve_accounts(args.service_user, args.group, args.admin_user)
        report = lockdown.apply(home, policy, accounts)
    except (lockdown.LockdownError, OSError) as exc:
        print(f"consent-guard lockdown: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not args.quiet:
        for line in report.done:
            print(line)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"locked down {home}: {args.service_user} (group {accounts.group_name}) reads, "
          f"only {args.admin_user} writes; ComfyUI appends to the audit log only")
    return EXIT_ERROR if any(n.startswith("WARNING") for n in report.notes) else EXIT_ALLOWED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="consent-guard",
        description="Check images for explicit content and protected people before they "
                    "are kept. "
                    f"State folder: ${'{'}CONSENT_GUARD_HOME{'}'} or {resolve_home()}")
    parser.add_argument("--version", action="version", version=f"consent-guard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    scan = sub.add_parser("scan", help="check image files and folders (folders are walked)")
    scan.add_argument("paths", nargs="+", metavar="PATH")
    scan.add_argument("--json", action="store_true", help="one JSON object per line")
    scan.add_argument("--policy", metavar="FILE", help="policy TOML (default: the home folder's)")
    scan.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    scan.add_argument("--models-dir", metavar="DIR", help="ComfyUI's models folder (weights in "
                      "DIR/consent_guard, an InsightFace pack in DIR/insightface)")
    scan.set_defaults(func=cmd_scan)

    cp = sub.add_parser("check-prompt", help="check prompts before generating (one per line on "
                                              "stdin when no TEXT is given)")
    cp.add_argument("texts", nargs="*", metavar="TEXT")
    cp.add_argument("--negative", metavar="TEXT", help="the negative prompt (never triggers)")
    cp.add_argument("--json", action="store_true",
                    help='one JSON line per prompt: {"text", "decision", "categories", "score", '
                         '"matched"}')
    cp.add_argument("--policy", metavar="FILE")
    cp.set_defaults(func=cmd_check_prompt)

    pol = sub.add_parser("policy", help="create, check, show or approve the policy")
    pol.add_argument("action", choices=["init", "check", "show", "path", "approve"],
                     help="approve: the admin approves the policy file as it is now (the same "
                          "as `admin approve-policy`)")
    pol.add_argument("file", nargs="?", help="a policy file to check or show (default: home's)")
    pol.add_argument("--force", action="store_true", help="init: overwrite an existing file")
    pol.add_argument("--passphrase-file", metavar="FILE",
                     help="init while locked, approve: the admin passphrase from a file")
    pol.set_defaults(func=cmd_policy)

    mod = sub.add_parser("models", help="verify the model files (sha256) and show where they are")
    mod.add_argument("--policy", metavar="FILE")
    mod.set_defaults(func=cmd_models)

    lock = sub.add_parser("lockdown", help="(root) make the home readable by the ComfyUI account "
                                           "and writable by the admin only")
    lock.add_argument("--service-user", required=True, metavar="USER",
                      help="the account ComfyUI runs as")
    lock.add_argument("--group", metavar="GROUP", help="the group that lets USER read (default: "
                      "USER's own group; it must hold nobody else)")
    lock.add_argument("--admin-user", default="root", metavar="ADMIN",
                      help="the account that owns and changes everything (default: root)")
    lock.add_argument("--policy", metavar="FILE", help="policy TOML (registry and audit paths)")
    lock.add_argument("-q", "--quiet", action="store_true", help="do not list every file")
    lock.set_defaults(func=cmd_lockdown)

    cli_identity.add_parser(sub)
    cli_audit.add_parser(sub)
    cli_admin.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PolicyError, ModelError, RegistryError) as exc:
        print(f"consent-guard: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except sqlite3.Error as exc:  # the registry should have said; never a traceback and exit 1
        print(f"consent-guard: the identity registry cannot be used: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # e.g. a home this account may not read: say so, exit 2
        print(f"consent-guard: {exc.strerror or exc}: {exc.filename or ''} (this account may "
              f"lack access to the Consent Guard home or the file)", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
