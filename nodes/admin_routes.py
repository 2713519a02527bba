"""HTTP routes for protection status, the policy and the audit log (ComfyUI front end).

    GET  /consent_guard/status  -> enforce mode, hooks, lock, audit log health (no secrets)
    GET  /consent_guard/policy  -> {text, locked, path}
    POST /consent_guard/policy  {"text": TOML, "passphrase": ...} -> validated, then written;
                                 the admin passphrase is needed while the lock is on
    POST /consent_guard/audit   {"passphrase", "since", "decision", "limit"} -> records; always
                                 needs the admin passphrase (the log holds ids and hashes)
    GET  /consent_guard/setup   -> {set_up, registry_exists, ...} (consent_guard/setup.py)
    POST /consent_guard/setup   {"passphrase", "passphrase_confirm", "enforce", "locked",
                                 "registry_passphrase"?} -> the first-run set-up; refused (409)
                                 once an admin passphrase exists
    POST /consent_guard/lock    {"locked": bool, "passphrase"} -> lock or unlock; always needs
                                 the admin passphrase
    POST /consent_guard/verify  {"image": base64 file, "name"?, "passphrase"?} -> the invisible
                                 mark, the signed verdict, this machine's or not; with the
                                 admin passphrase also the audit record it points to

Every refusal carries a "code" besides its message: "passphrase_missing" (type it) and
"passphrase_wrong" (it was checked and is wrong) are told apart, "not_set_up" when there is no
admin passphrase yet, and set-up's own codes (setup.py).

The logic is consent_guard/admin_api.py, shared with the A1111/Forge adapter (the same
paths, bodies and codes there); this module reads the JSON body and the peer's address and
runs the shared call, with ComfyUI's Site (routes.SITE), off the event loop.

Registered by routes.register (see routes.py for how ComfyUI serves them). Wrong passphrases
count in the same limiter as the enrolment dialog's (per client and globally; a request with
no passphrase is not a guess and is not counted). The status reply's "setup" says which home,
policy (sha256) and registry (path, how many protected) this server runs with, so that
`consent-guard doctor --url` can compare them with the admin's; "set_up" and "models" are for
the Consent Guard panel. The lock can be turned off here only with the admin passphrase (as
`consent-guard admin unlock` does); whoever holds it is the admin.
"""
from __future__ import annotations

import asyncio
import logging

from ..consent_guard import admin_api
from ..consent_guard.admin_api import Reply, is_loopback  # noqa: F401 - named here for tests
from .routes import SITE, _error, client_of

log = logging.getLogger("consent_guard")

STATUS_PATH = "/consent_guard/status"
POLICY_PATH = "/consent_guard/policy"
AUDIT_PATH = "/consent_guard/audit"
SETUP_PATH = "/consent_guard/setup"
LOCK_PATH = "/consent_guard/lock"
VERIFY_PATH = "/consent_guard/verify"


def status_sync() -> Reply:
    """The panel's and `consent-guard doctor --url`'s status: the enforce hooks (SITE.hooks),
    lock, audit log health, models and the running set-up."""
    return admin_api.status(SITE)


def policy_get_sync() -> Reply:
    return admin_api.policy_get(SITE)


def policy_post_sync(data: dict, client: str = "") -> Reply:
    return admin_api.policy_post(SITE, data.get("text"), data.get("passphrase"), client)


def audit_sync(data: dict, client: str = "") -> Reply:
    return admin_api.audit(SITE, data.get("passphrase"), data.get("since"),
                           data.get("decision"), data.get("limit"), client)


def setup_get_sync() -> Reply:
    return admin_api.setup_describe(SITE)


def setup_post_sync(data: dict, client: str = "") -> Reply:
    """The first-run set-up, only from this machine (admin_api.setup_post says why)."""
    return admin_api.setup_post(SITE, data.get("passphrase"), data.get("passphrase_confirm"),
                                data.get("enforce"), data.get("locked"),
                                data.get("registry_passphrase"), client)


def lock_post_sync(data: dict, client: str = "") -> Reply:
    return admin_api.lock_post(SITE, data.get("locked"), data.get("passphrase"), client)


def verify_sync(data: dict, client: str = "") -> Reply:
    return admin_api.verify_image(SITE, data.get("image"), data.get("name"),
                                  data.get("passphrase"), client)


async def _json(request) -> dict:
    try:
        data = await request.json()
    except Exception:
        raise ValueError("The request body must be JSON.")
    if not isinstance(data, dict):
        raise ValueError("The request body must be a JSON object.")
    return data


def _sync_handler(fn, with_body: bool):
    """An aiohttp-style handler running `fn` off the event loop; a handler with a body also
    gets the client's address, which the passphrase limiter counts against."""
    async def handler(request) -> Reply:
        try:
            args = (await _json(request), client_of(request)) if with_body else ()
        except ValueError as exc:
            return _error(400, str(exc), code=admin_api.BAD_REQUEST)
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except Exception as exc:  # never echo a passphrase: it is not in any message here
            log.exception("Consent Guard: %s failed", fn.__name__)
            return _error(500, f"{type(exc).__name__}: {exc}")
    handler.__name__ = fn.__name__
    return handler


handle_status = _sync_handler(status_sync, False)
handle_policy_get = _sync_handler(policy_get_sync, False)
handle_policy_post = _sync_handler(policy_post_sync, True)
handle_audit = _sync_handler(audit_sync, True)
handle_setup_get = _sync_handler(setup_get_sync, False)
handle_setup_post = _sync_handler(setup_post_sync, True)
handle_lock = _sync_handler(lock_post_sync, True)
handle_verify = _sync_handler(verify_sync, True)

ROUTES = (("GET", STATUS_PATH, handle_status), ("GET", POLICY_PATH, handle_policy_get),
          ("POST", POLICY_PATH, handle_policy_post), ("POST", AUDIT_PATH, handle_audit),
          ("GET", SETUP_PATH, handle_setup_get), ("POST", SETUP_PATH, handle_setup_post),
          ("POST", LOCK_PATH, handle_lock), ("POST", VERIFY_PATH, handle_verify))

