"""`consent-guard policy ...`: create, check, show, approve the policy file.

`policy show` prints the EFFECTIVE policy: every key with the value the checks use, defaults
included, as TOML that `policy check` accepts (paths that default to the home folder are
written out). Each key that is still at its default says so. `--json` gives the same as JSON.
"""
from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import List, Optional, Tuple

from . import cli_admin

EXIT_OK, EXIT_ERROR = 0, 2
POLICY_FILENAME = "policy.toml"  # policy.POLICY_FILENAME (a test checks they agree)

# (section, key, Policy field): the order `policy show` prints. A field missing here is still
# printed (as a comment saying so); tests/test_cli_policy_show.py fails until it is added.
KEYS: Tuple[Tuple[str, str, str], ...] = (
    ("", "version", ""), ("", "enforce", "enforce"),
    ("actions", "sexual", "actions.sexual"), ("actions", "nudity", "actions.nudity"),
    ("censor", "style", "censor_style"), ("censor", "margin", "censor_margin"),
    ("explicit", "nudenet_min_score", "nudenet_min_score"),
    ("explicit", "open_nsfw_safe_below", "open_nsfw_safe_below"),
    ("explicit", "open_nsfw_explicit_at", "open_nsfw_explicit_at"),
    ("explicit", "region_context", "region_context"),
    ("prompts", "sexual_explicit", "prompt_explicit"),
    ("prompts", "sexual_suggestive", "prompt_suggestive"),
    ("prompts", "classifier", "prompt_classifier"),
    ("prompts", "classifier_threshold", "prompt_classifier_threshold"),
    ("prompts", "confirm_words", "prompt_confirm_words"),
    ("faces", "backend", "face_backend"), ("faces", "insightface_pack", "insightface_pack"),
    ("faces", "min_face_px", "min_face_px"), ("faces", "detect_size", "detect_size"),
    ("faces.thresholds", "*", "face_thresholds"),
    ("identities", "registry", "registry_path"), ("identities", "key_file", "key_file"),
    ("minors", "threshold", "minor_threshold"), ("minors", "minor_unknown", "minor_unknown"),
    ("audit", "enabled", "audit_enabled"), ("audit", "path", "audit_path"),
    ("audit", "prompt", "audit_prompt"), ("audit", "max_mb", "audit_max_mb"),
    ("audit", "backups", "audit_backups"),
    ("provenance", "watermark", "provenance_watermark"),
    ("provenance", "sign", "provenance_sign"),
    ("models", "device", "device"), ("models.paths", "*", "model_paths"),
    ("limits", "max_pixels", "max_pixels"),
    ("messages", "contact", "contact"),
)
# Keys whose default is "not set": what the checks use then.
UNSET_MEANS = {"prompt_classifier_threshold": "the threshold stored with the trained weights",
               "face_thresholds": "the measured default of each face model",
               "model_paths": "the manifest's places (consent-guard models shows them)"}


def toml_value(value) -> str:
    """A value as TOML: strings quoted (JSON escapes are valid TOML), booleans lower case."""
    if hasattr(value, "value"):  # a Decision
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def _field(policy, name: str):
    if name.startswith("actions."):
        return policy.actions[name.split(".", 1)[1]]
    return getattr(policy, name)


def _trained_threshold() -> Optional[float]:
    """The prompt classifier's own threshold (stored with its weights), or None when they
    cannot be read (then `policy show` says "not set")."""
    try:
        from .prompts.classifier import PromptClassifier

        return PromptClassifier.load().threshold
    except Exception:
        return None


def _effective_paths(policy, home: Path) -> dict:
    """Paths that default to the home folder, as the checks will use them."""
    from .audit import audit_path
    from .registry import registry_paths

    db, key = registry_paths(policy, home)
    return {"registry_path": str(db), "key_file": str(key),
            "audit_path": str(audit_path(policy, home))}


def effective_toml(policy, home: Path) -> str:
    """The whole effective policy as TOML, each default marked."""
    from .policy import Policy

    defaults, paths = Policy(), _effective_paths(policy, home)
    lines: List[str] = [f"# Effective Consent Guard policy: "
                        f"{policy.source or 'built-in defaults (no policy file)'}",
                        f"# home: {home}", ""]
    section = ""
    for sec, key, name in KEYS:
        if sec != section:
            lines += ["", f"[{sec}]"]
            section = sec
        if not name:  # version: not a Policy field
            lines.append(f"{key} = 1")
            continue
        value = _field(policy, name)
        default = _field(defaults, name)
        if key == "*":  # a table of names: one line each, or what "none" means
            lines += [f"{k} = {toml_value(v)}" for k, v in sorted(value.items())] or \
                     [f"# none set: {UNSET_MEANS[name]}"]
            continue
        if name in paths and value is None:
            lines.append(f"{key} = {toml_value(paths[name])}  # default (in the home folder)")
            continue
        if value is None and name == "prompt_classifier_threshold" and _trained_threshold():
            lines.append(f"{key} = {toml_value(_trained_threshold())}  # default (the one "
                         f"stored with the trained weights)")
            continue
        if value is None:
            lines.append(f"# {key} not set: {UNSET_MEANS[name]}")
            continue
        lines.append(f"{key} = {toml_value(value)}" + ("  # default" if value == default
                                                       else ""))
    lines += _unmapped(policy)
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def _unmapped(policy) -> List[str]:
    """Fields this file does not know yet: printed as comments, so nothing is hidden."""
    known = {name for _, _, name in KEYS} | {"actions", "source"}
    extra = [f.name for f in fields(policy) if f.name not in known]
    if not extra:
        return []
    return ["", "# settings `policy show` cannot name as keys yet:"] + \
        [f"# {name} = {_field(policy, name)!r}" for name in extra]


def effective_dict(policy, home: Path) -> dict:
    """`policy show --json`: every field, paths made effective."""
    out = {}
    for f in fields(policy):
        value = getattr(policy, f.name)
        if f.name == "actions":
            value = {k: v.value for k, v in value.items()}
        elif hasattr(value, "value"):
            value = value.value
        elif isinstance(value, dict):
            value = dict(value)
        out[f.name] = value
    for name, path in _effective_paths(policy, home).items():
        if out.get(name) is None:
            out[name] = path
    return out


def _init(args, home: Path, target: Path) -> int:
    from . import admin, expect
    from .policy import DEFAULT_POLICY_TOML

    if target.exists() and not args.force:
        print(f"{target} exists; use --force to overwrite it.", file=sys.stderr)
        return EXIT_ERROR
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
    return EXIT_OK


def cmd_policy(args) -> int:
    from .policy import load_policy

    home = args.home
    target = home / POLICY_FILENAME
    if args.action == "path":
        print(target)
    elif args.action == "init":
        return _init(args, home, target)
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
        if args.json:
            print(json.dumps(effective_dict(policy, home), indent=2, ensure_ascii=False))
        else:
            sys.stdout.write(effective_toml(policy, home))
    return EXIT_OK


def add_parser(sub) -> None:
    pol = sub.add_parser("policy", help="create, check, show or approve the policy")
    pol.add_argument("action", choices=["init", "check", "show", "path", "approve"],
                     help="show: every setting in effect, defaults included; approve: the "
                          "admin approves the policy file as it is now (the same as `admin "
                          "approve-policy`)")
    pol.add_argument("file", nargs="?", help="a policy file to check or show (default: home's)")
    pol.add_argument("--force", action="store_true", help="init: overwrite an existing file")
    pol.add_argument("--json", action="store_true", help="show: as JSON")
    pol.add_argument("--passphrase-file", metavar="FILE",
                     help="init while locked, approve: the admin passphrase from a file")
    pol.set_defaults(func=cmd_policy)


__all__ = ["add_parser", "cmd_policy", "effective_toml", "effective_dict"]
