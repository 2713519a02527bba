"""The `consent-guard` command line (also `python -m consent_guard`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterator, List, Optional

from . import __version__, cli_admin, cli_audit, cli_identity
from .engine import Engine
from .home import resolve_home
from .models import ModelError, ModelResolver, describe
from .policy import DEFAULT_POLICY_TOML, POLICY_FILENAME, PolicyError, load_policy
from .registry import RegistryError, open_for_matching
from .verdict import Decision

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
EXIT_ALLOWED, EXIT_FLAGGED, EXIT_ERROR = 0, 1, 2


def _expand(paths: List[str]) -> Iterator[tuple]:
    """(path, came_from_folder) for each file: files as given, folders walked for images."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        yield Path(root) / name, True
        else:
            yield path, False


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
    registry = open_for_matching(policy, resolve_home())  # None when nobody is enrolled
    models = Path(args.models_dir) if args.models_dir else None
    engine = Engine(policy, registry=registry,
                    model_dirs=[models / "consent_guard"] if models else [],
                    insightface_dirs=[models / "insightface"] if models else [])
    files = list(_expand(args.paths))
    if not files:
        print("consent-guard: no images found in " + " ".join(args.paths), file=sys.stderr)
        return EXIT_ERROR
    show_bar = any(from_dir for _, from_dir in files) and sys.stderr.isatty() and not args.quiet
    status = EXIT_ALLOWED
    for path, _ in _progress(files, show_bar):
        verdict = engine.check_file(path)
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
    engine = Engine(policy, registry=open_for_matching(policy, resolve_home()))
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

    pol = sub.add_parser("policy", help="create, check or show the policy")
    pol.add_argument("action", choices=["init", "check", "show", "path"])
    pol.add_argument("file", nargs="?", help="a policy file to check or show (default: home's)")
    pol.add_argument("--force", action="store_true", help="init: overwrite an existing file")
    pol.add_argument("--passphrase-file", metavar="FILE",
                     help="init while locked: the admin passphrase from a file")
    pol.set_defaults(func=cmd_policy)

    mod = sub.add_parser("models", help="verify the model files (sha256) and show where they are")
    mod.add_argument("--policy", metavar="FILE")
    mod.set_defaults(func=cmd_models)

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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
