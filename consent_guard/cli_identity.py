"""`consent-guard identity ...`: enrol, list, revoke, match, export and import protected people.

Every change needs the admin passphrase: from --passphrase-file, $CONSENT_GUARD_PASSPHRASE, or
typed at a prompt. Reading (list, match) also works with the key file beside the registry.
The registry, the face code and numpy are imported by the command that needs them (a fast
--help); SCOPES and ENV_PASSPHRASE are registry.py's (a test checks they agree).
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from .home import home_of

EXIT_OK, EXIT_MATCH, EXIT_ERROR = 0, 1, 2
ENV_PASSPHRASE = "CONSENT_GUARD_PASSPHRASE"  # registry.ENV_PASSPHRASE
SCOPES = ("explicit", "any")  # registry.SCOPES
ENV_EXPORT_PASSPHRASE = "CONSENT_GUARD_EXPORT_PASSPHRASE"


def _passphrase(args, confirm: bool = False, prompt: str = "Admin passphrase: ",
                file_attr: str = "passphrase_file", env: str = ENV_PASSPHRASE) -> str:
    from .registry import RegistryError, read_passphrase_file

    path = getattr(args, file_attr, None)
    if path:
        return read_passphrase_file(Path(path))
    if os.environ.get(env):
        return os.environ[env]
    if not sys.stdin.isatty():
        raise RegistryError(f"A passphrase is needed: give --{file_attr.replace('_', '-')} or "
                            f"set ${env} (no terminal to ask on).")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != first:
        raise RegistryError("The two passphrases differ.")
    if len(first) < 8:
        raise RegistryError("Use a passphrase of at least 8 characters.")
    return first


def _context(args):
    from .policy import load_policy
    from .registry import registry_paths

    policy = load_policy(Path(args.policy) if args.policy else None, home=home_of(args))
    db, key = registry_paths(policy, home_of(args))
    if args.registry:
        db = Path(args.registry)
        key = db.with_name(key.name)
    return policy, db, key


def _model_dirs(args) -> tuple:
    """(consent_guard model dirs, insightface dirs) from --models-dir (ComfyUI's models/)."""
    if not args.models_dir:
        return [], []
    root = Path(args.models_dir)
    return [root / "consent_guard"], [root / "insightface"]


def _open_admin(args, db: Path, key: Path, create: bool = False):
    """The registry opened with the admin passphrase (created first when asked and absent)."""
    from .identities import open_admin
    from .registry import Registry

    if create and not db.exists():
        print(f"Creating the identity registry {db}. Choose the admin passphrase: it is "
              f"needed for every change and cannot be recovered.", file=sys.stderr)
        return open_admin(db, key, _passphrase(args, confirm=True),
                          key_file=not getattr(args, "no_key_file", False),
                          home=home_of(args))
    return Registry.open(db, passphrase=_passphrase(args))


def _open_reader(args, db: Path, key: Path):
    """Read-only: listing and matching work on a registry this account cannot write."""
    from .registry import Registry

    passphrase = None
    if args.passphrase_file or os.environ.get(ENV_PASSPHRASE):
        passphrase = _passphrase(args)
    return Registry.open(db, passphrase=passphrase, key_file=key, read_only=True)


def _report_damaged(reg, what: str) -> int:
    """Print each damaged row (skipped by `what`) on stderr; returns how many there were."""
    damaged = reg.damaged_rows()
    for row in damaged:
        print(f"DAMAGED  {row}: skipped by {what}", file=sys.stderr)
    if damaged:
        print(f"{len(damaged)} damaged row(s) in {reg.path}. Matching refuses to run until they "
              f"are gone: revoke each damaged identity by its id and enrol them again, or "
              f"import a recent export.", file=sys.stderr)
    return len(damaged)


def cmd_init(args) -> int:
    _, db, key = _context(args)
    if db.exists():
        print(f"A registry already exists at {db}.", file=sys.stderr)
        return EXIT_ERROR
    _open_admin(args, db, key, create=True).close()
    print(f"created {db}")
    return EXIT_OK


def cmd_enroll(args) -> int:
    from .cli import missing_paths, report_missing
    from .identities import EnrolmentRefused, enrol_person
    from .registry import Consent

    missing = missing_paths(args.photos)
    if missing:
        return report_missing(f"identity {args.command_name}", missing)
    policy, db, key = _context(args)
    model_dirs, insight_dirs = _model_dirs(args)
    if not db.exists() and args.command_name == "enroll":
        print(f"Creating the identity registry {db}. Choose the admin passphrase: it is "
              f"needed for every change and cannot be recovered.", file=sys.stderr)
        passphrase = _passphrase(args, confirm=True)
    else:
        passphrase = _passphrase(args)
    adding = args.command_name == "add-photos"
    consent = None if adding else Consent(args.consent_by, args.on_behalf_of or "",
                                          args.consent_date or _today(), args.note or "")
    try:
        result = enrol_person(policy, home_of(args), passphrase, name=args.name,
                              scope=getattr(args, "scope", ""), consent=consent,
                              photos=args.photos, aliases=getattr(args, "alias", None) or (),
                              add_to=args.name if adding else "", model_dirs=model_dirs,
                              insightface_dirs=insight_dirs, registry_path=db,
                              key_file=not args.no_key_file)
    except EnrolmentRefused as exc:
        for c in exc.checks:
            print(f"REFUSED  {c.source}: {c.reason}", file=sys.stderr)
        print("No photo was usable; nothing was enrolled.", file=sys.stderr)
        return EXIT_ERROR
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for c in result.checks:
        print(f"{'ok     ' if c.ok else 'REFUSED'}  {c.source}: {c.reason}", file=sys.stderr)
    ident, accepted = result.identity, sum(c.ok for c in result.checks)
    print(f"{'added photos to' if adding else 'enrolled'} {ident.name} ({ident.id}, scope "
          f"{ident.scope}) from {accepted} of {len(result.checks)} photo(s), embedded with "
          f"{', '.join(result.backends)}")
    if not adding and not args.no_key_file and key.exists():
        print(f"Key file for unattended matching (ComfyUI): {key}. Only the admin and the "
              f"account that runs ComfyUI should be able to read it.", file=sys.stderr)
    if accepted < 3:
        print("Tip: 3 or more photos (different days, angles, light) match more reliably.",
              file=sys.stderr)
    return EXIT_OK


def _today() -> str:
    import time

    return time.strftime("%Y-%m-%d")


def cmd_list(args) -> int:
    _, db, key = _context(args)
    with _open_reader(args, db, key) as reg:
        people = reg.identities(skip_damaged=True)
        damaged = _report_damaged(reg, "list")
    if args.json:
        for p in people:
            print(json.dumps(p.public_dict()))
        return EXIT_ERROR if damaged else EXIT_OK
    if not people and not damaged:
        print(f"nobody is enrolled in {db}")
    for p in people:
        consent = p.consent
        who = f"consent by {consent.by}" if consent else "no consent record"
        if consent and consent.on_behalf_of:
            who += f" on behalf of {consent.on_behalf_of}"
        aliases = f" aka {', '.join(p.aliases)}" if p.aliases else ""
        models = ", ".join(f"{m} x{n}" for m, n in sorted(p.models.items()))
        print(f"{p.id}  {p.name}{aliases}  scope={p.scope}  {who} ({consent.at if consent else '-'})"
              f"  embeddings: {models}")
    return EXIT_ERROR if damaged else EXIT_OK


def cmd_revoke(args) -> int:
    _, db, key = _context(args)
    with _open_admin(args, db, key) as reg:
        ident_id, name = _revoke_target(reg, args.name)
        if not args.yes and sys.stdin.isatty():
            answer = input(f"Delete {name} ({ident_id}) and all their face data for good? "
                           f"[y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return EXIT_ERROR
        reg.revoke(ident_id)
    print(f"revoked {name} ({ident_id}): their embeddings are deleted")
    return EXIT_OK


def _revoke_target(reg, name_or_id: str) -> tuple:
    """(id, display name) to revoke: a readable identity by name, alias or id, or a damaged
    identity row by its exact id (its name cannot be read, which is why it must go)."""
    from .registry import RegistryError

    try:
        ident = reg.find(name_or_id)
        return ident.id, ident.name
    except RegistryError:
        if any(f"(id {name_or_id!r})" in row for row in reg.damaged_rows()):
            return name_or_id, "a damaged identity"
        raise


def cmd_match(args) -> int:
    from .cli import missing_paths, report_missing
    from .engine import Engine
    from .imageio import ImageInputError, read_image_frames

    missing = missing_paths(args.photos)
    if missing:
        return report_missing("identity match", missing)
    policy, db, key = _context(args)
    model_dirs, insight_dirs = _model_dirs(args)
    reg = _open_reader(args, db, key)
    engine = Engine(policy, registry=reg, model_dirs=model_dirs, insightface_dirs=insight_dirs)
    names = {p.id: p.name for p in reg.identities()}
    stage = engine.face_stage()
    for note in engine.face_notes:
        print(f"note: {note}", file=sys.stderr)
    status = EXIT_OK
    for photo in args.photos:
        try:
            frames, _ = read_image_frames(Path(photo), policy.max_pixels)
        except ImageInputError as exc:
            print(f"{photo}: unusable image: {exc}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        findings = stage.findings(frames[0]) if stage else []
        if any(f.identity for f in findings) and status == EXIT_OK:
            status = EXIT_MATCH
        if args.json:
            print(json.dumps({"path": photo, "faces": [
                {**f.to_dict(), "name": names.get(f.identity)} for f in findings]}))
            continue
        if not findings:
            print(f"{photo}: no face of at least {policy.min_face_px:.0f} px"
                  + ("" if stage else " (nobody is enrolled)"))
        for f in findings:
            who = f"{names.get(f.identity)} ({f.identity}, scope {f.scope})" if f.identity \
                else "no protected person"
            sim = f", similarity {f.similarity:.3f}" if f.similarity is not None else ""
            print(f"{photo}: face at {list(f.box)}: {who}{sim}")
    reg.close()
    return status


def cmd_export(args) -> int:
    _, db, key = _context(args)
    with _open_admin(args, db, key) as reg:
        secret = _passphrase(args, confirm=True, prompt="Passphrase for the export file: ",
                             file_attr="export_passphrase_file", env=ENV_EXPORT_PASSPHRASE)
        n = reg.export(Path(args.file), secret)
        damaged = _report_damaged(reg, "export")
    print(f"exported {n} identities to {args.file} (encrypted; give its passphrase only to "
          f"the admins who import it)")
    return EXIT_ERROR if damaged else EXIT_OK


def cmd_import(args) -> int:
    _, db, key = _context(args)
    with _open_admin(args, db, key, create=True) as reg:
        secret = _passphrase(args, prompt="Passphrase of the export file: ",
                             file_attr="export_passphrase_file", env=ENV_EXPORT_PASSPHRASE)
        n, revoked = reg.import_file(Path(args.file), secret, replace=args.replace)
    print(f"imported {n} identities from {args.file}"
          + (f"; revoked {revoked} not in the file" if revoked else ""))
    return EXIT_OK


def cmd_key_file(args) -> int:
    _, db, key = _context(args)
    with _open_admin(args, db, key) as reg:
        reg.write_key_file(key)
    print(f"wrote {key}: keep it readable only by the admin and the account that runs ComfyUI "
          f"(`consent-guard lockdown --service-user USER` does that)")
    return EXIT_OK


def add_parser(sub) -> None:
    ident = sub.add_parser("identity", help="protected people: enrol, list, revoke, match, "
                                            "export, import")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="FILE", help="registry file (default: "
                        "[identities] registry in the policy, else identities.db in the home)")
    common.add_argument("--policy", metavar="FILE")
    common.add_argument("--passphrase-file", metavar="FILE",
                        help=f"admin passphrase from a file (or set ${ENV_PASSPHRASE})")
    common.add_argument("--models-dir", metavar="DIR",
                        help="ComfyUI's models folder: also embed with the InsightFace pack in "
                             "DIR/insightface, and look for weights in DIR/consent_guard")
    isub = ident.add_subparsers(dest="identity_command", required=True)

    p = isub.add_parser("init", parents=[common], help="create an empty registry")
    p.add_argument("--no-key-file", action="store_true",
                   help="no key file: matching then needs the passphrase in its environment")
    p.set_defaults(func=cmd_init)

    p = isub.add_parser("enroll", parents=[common], help="enrol a person from their photos")
    p.add_argument("--name", required=True, help="display name (shown to the admin only)")
    p.add_argument("--alias", action="append", help="another name or spelling (repeatable); "
                   "the prompt check refuses sexual prompts naming them")
    p.add_argument("--scope", required=True, choices=SCOPES,
                   help="explicit: block explicit images showing them; any: block every "
                        "generated image showing them and refuse their photos as inputs")
    p.add_argument("--consent-by", required=True, metavar="WHO",
                   help="who consented: the person, or a parent or guardian or school officer")
    p.add_argument("--on-behalf-of", metavar="WHO", help="whose behalf, if not their own")
    p.add_argument("--consent-date", metavar="DATE", help="when consent was given "
                   "(default: today)")
    p.add_argument("--note", help="free note for the consent record")
    p.add_argument("--no-key-file", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("photos", nargs="+", metavar="PHOTO",
                   help="photos with exactly one face each (3 or more recommended)")
    p.set_defaults(func=cmd_enroll, command_name="enroll")

    p = isub.add_parser("add-photos", parents=[common],
                        help="add photos to someone enrolled (also: re-enrol for a new backend)")
    p.add_argument("name", help="display name, alias or id")
    p.add_argument("photos", nargs="+", metavar="PHOTO")
    p.add_argument("--no-key-file", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_enroll, command_name="add-photos")

    p = isub.add_parser("list", parents=[common], help="who is enrolled (no biometrics)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = isub.add_parser("revoke", parents=[common], help="delete a person and their face data")
    p.add_argument("name", help="display name, alias or id")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_revoke)

    p = isub.add_parser("match", parents=[common], help="whom the faces in photos match "
                                                        "(exit 1 when someone protected does)")
    p.add_argument("photos", nargs="+", metavar="PHOTO")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_match)

    for name, helptext in (("export", "write the whole registry to one encrypted file"),
                           ("import", "load an export (e.g. on every lab machine)")):
        p = isub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("file")
        p.add_argument("--export-passphrase-file", metavar="FILE",
                       help=f"the export file's passphrase (or ${ENV_EXPORT_PASSPHRASE})")
        if name == "import":
            p.add_argument("--replace", action="store_true",
                           help="also revoke everyone not in the file (machines end up equal)")
            p.add_argument("--no-key-file", action="store_true",
                           help="when this creates the registry: no key file")
        p.set_defaults(func=cmd_export if name == "export" else cmd_import)

    p = isub.add_parser("key-file", parents=[common],
                        help="(re)write the key file that lets ComfyUI read the registry")
    p.set_defaults(func=cmd_key_file)


__all__ = ["add_parser"]
