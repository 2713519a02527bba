"""`consent-guard admin ...` (the lock, and the admin's record of the approved policy and the
registry: approve-policy, forget-registry; see expect.py) and `consent-guard doctor` (is
protection active). Modules are imported by the command that needs them (a fast --help)."""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from .home import home_of

ENV_ADMIN_PASSPHRASE = "CONSENT_GUARD_ADMIN_PASSPHRASE"
EXIT_OK, EXIT_PROBLEM, EXIT_ERROR = 0, 1, 2


def _ask(args, prompt: str, attr: str = "passphrase_file", confirm: bool = False) -> str:
    from . import admin
    from .registry import read_passphrase_file

    path = getattr(args, attr, None)
    if path:
        return read_passphrase_file(Path(path))
    if attr == "passphrase_file" and os.environ.get(ENV_ADMIN_PASSPHRASE):
        return os.environ[ENV_ADMIN_PASSPHRASE]
    if not sys.stdin.isatty():
        raise admin.AdminError(f"A passphrase is needed: give --{attr.replace('_', '-')} or set "
                               f"${ENV_ADMIN_PASSPHRASE} (no terminal to ask on).")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != first:
        raise admin.AdminError("The two passphrases differ.")
    return first


def cmd_admin(args) -> int:
    from . import admin

    home = home_of(args)
    try:
        if args.admin_command == "status":
            st = admin.state(home)
            print(json.dumps({"home": str(home), "passphrase_set": st.has_passphrase,
                              "locked": st.locked, "problem": st.problem}))
            return EXIT_OK
        if args.admin_command == "set-passphrase":
            current = None
            if admin.state(home).has_passphrase:
                current = _ask(args, "Current admin passphrase: ")
            new = _ask(args, "New admin passphrase: ", attr="new_passphrase_file", confirm=True)
            admin.set_passphrase(home, new, current)
            print(f"admin passphrase set ({admin.admin_path(home)})")
            return EXIT_OK
        if args.admin_command == "approve-policy":
            return _approve_policy(args, home)
        if args.admin_command == "forget-registry":
            return _forget_registry(args, home)
        locked = args.admin_command == "lock"
        admin.set_locked(home, locked, _ask(args, "Admin passphrase: "))
        print("locked: the policy, the registry and the plugin's settings cannot be changed "
              "from ComfyUI without the admin passphrase" if locked else "unlocked")
        return EXIT_OK
    except (admin.AdminError, OSError) as exc:
        print(f"consent-guard: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _as_admin(args, home: Path, what: str) -> None:
    """Once an admin passphrase is set, changing the admin's record needs it, lock or not:
    otherwise whoever swapped the policy could approve it too."""
    from . import admin

    if admin.state(home).has_passphrase:
        if not admin.verify(home, _ask(args, "Admin passphrase: ")):
            raise admin.AdminLocked(f"Wrong admin passphrase: {what} refused.")
        return
    admin.require_admin(home, None, what)  # a damaged admin.json refuses


def _approve_policy(args, home: Path) -> int:
    from . import expect
    from .policy import POLICY_FILENAME, load_policy

    _as_admin(args, home, "approving the policy")
    path = home / POLICY_FILENAME
    try:
        policy = load_policy(home=home)
    except Exception as exc:
        print(f"consent-guard: the policy {path} is not valid, so it was not approved: {exc}",
              file=sys.stderr)
        return EXIT_ERROR
    digest = expect.record_policy(home, path)
    print(f"approved {path} (sha256 {digest}, enforce {'on' if policy.enforce else 'off'})"
          if digest else f"approved running without a policy file ({path} does not exist)")
    return EXIT_OK


def _forget_registry(args, home: Path) -> int:
    from . import expect

    _as_admin(args, home, "forgetting the registry")
    expect.forget_registry(home)
    print("the admin's record no longer expects an identity registry")
    return EXIT_OK


def cmd_doctor(args) -> int:
    from . import doctor

    choice = getattr(args, "home_choice", None)
    home = home_of(args)
    comfyui = Path(args.comfyui) if getattr(args, "comfyui", None) else \
        (choice.comfyui if choice else None)  # the ComfyUI this package is installed in
    webui = Path(args.webui).expanduser() if getattr(args, "webui", None) else None
    checks = doctor.run(home, comfyui, url=args.url, user=args.user, webui=webui)
    where = doctor.Check("home", doctor.INFO, f"{home} ({choice.reason if choice else 'given'})")
    checks.insert(0, where)
    fresh = doctor.not_set_up(home)
    if args.json:
        print(json.dumps([c.to_dict() for c in checks], indent=1))
    else:
        for c in checks:
            # a set-up step's fix is the steps printed once at the end
            shown = c.fix and c.status not in (doctor.OK, doctor.INFO, doctor.TODO)
            fix = f"\n        fix: {c.fix}" if shown else ""
            print(f"[{c.status:4}] {c.name}: {c.detail}{fix}")
        failed = sum(c.status == doctor.FAIL for c in checks)
        if fresh:
            print(doctor.SETUP_STEPS.format(home=home))
        if failed:
            print(f"{failed} problem(s): protection is not complete")
        elif not fresh:
            print("protection looks complete")
    if any(c.status == doctor.FAIL for c in checks) or fresh:
        return EXIT_PROBLEM
    return EXIT_OK


def cmd_setup(args) -> int:
    """`consent-guard setup`: the first-run set-up the ComfyUI dialog does (consent_guard/
    setup.py): one admin passphrase that also seals the identity registry, enforce mode, lock."""
    from . import setup

    home = home_of(args)
    try:
        passphrase = _ask(args, "New admin passphrase (it also seals the list of protected "
                                "people; it cannot be recovered): ", confirm=True)
        registry_passphrase = None
        if args.registry_passphrase_file:
            registry_passphrase = _ask(args, "", attr="registry_passphrase_file")
        try:
            result = setup.run_setup(home, passphrase, passphrase, enforce=args.enforce,
                                     locked=args.lock, registry_passphrase=registry_passphrase,
                                     source="cli")
        except setup.SetupError as exc:
            if exc.code != setup.REGISTRY_PASSPHRASE_NEEDED or registry_passphrase:
                raise
            # an existing registry sealed with another passphrase: ask for it once
            registry_passphrase = _ask(args, "The identity registry's current passphrase: ",
                                       attr="registry_passphrase_file")
            result = setup.run_setup(home, passphrase, passphrase, enforce=args.enforce,
                                     locked=args.lock, registry_passphrase=registry_passphrase,
                                     source="cli")
    except setup.SetupError as exc:
        print(f"consent-guard setup: {exc}", file=sys.stderr)
        for step in getattr(exc, "done", None) or []:
            print(f"  already done: {step}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # AdminError from _ask, an unreadable passphrase file
        print(f"consent-guard setup: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for step in result.to_dict().get("done", []):
        print(f"  {step}")
    print(f"Consent Guard is set up in {home}. Check it with `consent-guard doctor`.")
    return EXIT_OK


def add_parser(sub) -> None:
    adm = sub.add_parser("admin", help="the admin lock: set-passphrase, lock, unlock, status, "
                                       "approve-policy, forget-registry")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--passphrase-file", metavar="FILE",
                        help=f"the admin passphrase from a file (or ${ENV_ADMIN_PASSPHRASE})")
    asub = adm.add_subparsers(dest="admin_command", required=True)
    p = asub.add_parser("set-passphrase", parents=[common],
                        help="set or change the admin passphrase (stored as a scrypt hash)")
    p.add_argument("--new-passphrase-file", metavar="FILE")
    asub.add_parser("lock", parents=[common], help="lock: changes from ComfyUI need the "
                                                   "admin passphrase; nodes can only be stricter")
    asub.add_parser("unlock", parents=[common], help="unlock")
    asub.add_parser("status", help="whether a passphrase is set and the lock is on")
    asub.add_parser("approve-policy", parents=[common],
                    help="approve the policy file as it is now; in enforce mode a policy "
                         "changed or removed without this is refused")
    asub.add_parser("forget-registry", parents=[common],
                    help="the identity registry was removed on purpose: stop expecting it")
    adm.set_defaults(func=cmd_admin)

    st = sub.add_parser("setup", help="first-run set-up: one admin passphrase (it also seals "
                                      "the identity registry), enforce mode and the lock")
    st.add_argument("--passphrase-file", metavar="FILE",
                    help=f"the new admin passphrase from a file (or ${ENV_ADMIN_PASSPHRASE})")
    st.add_argument("--registry-passphrase-file", metavar="FILE",
                    help="an existing registry's passphrase, when it differs")
    st.add_argument("--enforce", action=argparse.BooleanOptionalAction, default=True,
                    help="check every workflow, not only Consent Guard's nodes (default: on)")
    st.add_argument("--lock", action=argparse.BooleanOptionalAction, default=True,
                    help="changes from ComfyUI need the admin passphrase (default: on)")
    st.set_defaults(func=cmd_setup)

    doc = sub.add_parser("doctor", help="is protection active on this ComfyUI or "
                                        "AUTOMATIC1111 / Forge install?")
    doc.add_argument("--comfyui", metavar="DIR", default=argparse.SUPPRESS,
                     help="the ComfyUI folder (custom_nodes, models; default: the one this "
                          "package is installed in); its user/consent_guard is the home unless "
                          "$CONSENT_GUARD_HOME is set")
    doc.add_argument("--webui", metavar="DIR", default=argparse.SUPPRESS,
                     help="an AUTOMATIC1111 / Forge folder (or its --data-dir): checks that "
                          "the extension is there and not disabled; its consent_guard folder "
                          "is the home unless $CONSENT_GUARD_HOME is set")
    doc.add_argument("--url", metavar="URL", help="a running ComfyUI, e.g. "
                                                  "http://127.0.0.1:8188")
    doc.add_argument("--user", metavar="NAME", help="the account people use ComfyUI as "
                                                    "(default: whoever runs doctor)")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=cmd_doctor)
