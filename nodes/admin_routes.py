"""HTTP routes for protection status, the policy and the audit log (ComfyUI front end).

    GET  /consent_guard/status  -> enforce mode, hooks, lock, audit log health (no secrets)
    GET  /consent_guard/policy  -> {text, locked, path}
    POST /consent_guard/policy  {"text": TOML, "passphrase": ...} -> validated, then written;
                                 the admin passphrase is needed while the lock is on
    POST /consent_guard/audit   {"passphrase", "since", "decision", "limit"} -> records; always
                                 needs the admin passphrase (the log holds ids and hashes)

Registered by routes.register (see routes.py for how ComfyUI serves them). Wrong passphrases
count in the same limiter as the enrolment dialog's (per client and globally; a request with
no passphrase is not a guess and is not counted). The status reply's "setup" says which home,
policy (sha256) and registry (path, how many protected) this server runs with, so that
`consent-guard doctor --url` can compare them with the admin's. Nothing here can turn the lock
off: that is `consent-guard admin unlock`, on the machine, by the admin.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Optional

from ..consent_guard import admin, expect
from ..consent_guard.policy import POLICY_FILENAME, PolicyError
from . import routes
from .comfy_bridge import ConsentGuardError, home
from .routes import Reply, _error, _too_many, client_of, running_setup

log = logging.getLogger("consent_guard")

STATUS_PATH = "/consent_guard/status"
POLICY_PATH = "/consent_guard/policy"
AUDIT_PATH = "/consent_guard/audit"
MAX_POLICY_BYTES = 64 * 1024
MAX_AUDIT_RECORDS = 2000


def status_sync() -> Reply:
    from . import enforce

    body = {"ok": True, **enforce.status()}
    st = admin.state(home())
    body["locked"], body["admin_passphrase_set"] = st.locked, st.has_passphrase
    engine = None
    try:
        from .image_nodes import get_engine
        engine = get_engine()
        audit = engine.audit
        body["audit"] = None if audit is None else {"healthy": audit.healthy,
                                                     "problem": audit.last_error}
        body["engine_problem"] = None
    except ConsentGuardError as exc:
        body["audit"], body["engine_problem"] = None, str(exc)
    body["setup"] = running_setup(engine)  # which home, policy and registry: doctor compares
    return Reply(200, body)


async def _json(request) -> dict:
    try:
        data = await request.json()
    except Exception:
        raise ValueError("The request body must be JSON.")
    if not isinstance(data, dict):
        raise ValueError("The request body must be a JSON object.")
    return data


def _admin_ok(passphrase: Optional[str], what: str, always: bool = False,
              client: str = "") -> Optional[Reply]:
    """None when the change may go ahead; else the reply refusing it. `always`: the admin
    passphrase is needed even while unlocked. A request with no passphrase is refused without
    a check and is not counted (it guesses nothing); every check of a passphrase is reserved
    in the limiter first (routes.PassphraseLimiter), per client."""
    st = admin.state(home())
    if always and not st.has_passphrase:
        return _error(403, f"{what} is for the admin: set an admin passphrase first "
                           f"(`consent-guard admin set-passphrase`).")
    if not always and not st.locked:
        return None
    if not passphrase:
        return _error(403, f"Consent Guard is locked by the admin: {what} needs the admin "
                           f"passphrase." if st.locked else f"{what} needs the admin "
                                                            f"passphrase.", locked=st.locked)
    ticket, retry = routes.LIMITER.begin(client)
    if ticket is None:
        return _too_many(retry)
    ok = False
    try:
        ok = admin.verify(home(), passphrase) and not st.problem
    finally:
        routes.LIMITER.end(ticket, routes.RIGHT if ok else routes.WRONG)
    if ok:
        return None
    if always:
        return _error(403, f"Wrong admin passphrase: {what} refused.")
    message = (f"Consent Guard is locked and {st.problem}; {what} was refused." if st.problem
               else f"Consent Guard is locked by the admin: {what} needs the admin passphrase.")
    log.warning("Consent Guard: %s", message)
    return _error(403, message, locked=True)


def policy_get_sync() -> Reply:
    path = home() / POLICY_FILENAME
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else None
    except OSError as exc:
        return _error(500, f"The policy {path} cannot be read: {exc}")
    return Reply(200, {"ok": True, "path": str(path), "text": text,
                       "locked": admin.is_locked(home())})


def policy_post_sync(data: dict, client: str = "") -> Reply:
    text, passphrase = data.get("text"), data.get("passphrase")
    if not isinstance(text, str) or len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        return _error(400, f"Send the policy as 'text' (TOML, at most {MAX_POLICY_BYTES} bytes).")
    refused = _admin_ok(passphrase if isinstance(passphrase, str) else None,
                        "changing the policy", client=client)
    if refused is not None:
        return refused
    from ..consent_guard.policy import policy_from_dict
    try:
        try:
            import tomllib
        except ModuleNotFoundError:  # pragma: no cover
            import tomli as tomllib
        policy_from_dict(tomllib.loads(text), "<the policy sent>")
    except (PolicyError, ValueError) as exc:
        return _error(400, f"The policy was not changed: {exc}")
    path = home() / POLICY_FILENAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        return _error(500, f"The policy {path} cannot be written: {exc}")
    try:  # accepted with the admin passphrase (or no lock): this is the approved policy now
        expect.record_policy(home(), path)
    except (OSError, expect.ExpectationError) as exc:
        log.error("Consent Guard: the policy was written but not recorded as approved: %s", exc)
        return _error(500, f"The policy was written, but {expect.expect_path(home())} cannot "
                           f"be: {exc}. In enforce mode it is refused until the admin runs "
                           f"`{expect.APPROVE_COMMAND}`.")
    log.warning("Consent Guard: the policy was changed from the ComfyUI front end")
    return Reply(200, {"ok": True, "path": str(path)})


def audit_sync(data: dict, client: str = "") -> Reply:
    refused = _admin_ok(data.get("passphrase") if isinstance(data.get("passphrase"), str)
                        else None, "reading the audit log", always=True, client=client)
    if refused is not None:
        return refused
    from ..consent_guard.audit import audit_for, read_records
    from ..consent_guard.policy import load_policy

    try:
        log_file = audit_for(load_policy(home=home()), home())
    except Exception as exc:
        return _error(500, f"The audit log cannot be found: {exc}")
    if log_file is None:
        return Reply(200, {"ok": True, "records": [], "note": "[audit] enabled = false"})
    decision = data.get("decision") or None
    try:
        limit = max(1, min(int(data.get("limit") or 200), MAX_AUDIT_RECORDS))
    except (TypeError, ValueError):
        return _error(400, "limit must be a number.")
    try:
        records = list(read_records(log_file.path, since=data.get("since") or None,
                                    decision=decision))
    except ValueError as exc:
        return _error(400, str(exc))
    return Reply(200, {"ok": True, "records": records[-limit:], "total": len(records),
                       "path": str(log_file.path)})


def _sync_handler(fn, with_body: bool):
    """An aiohttp-style handler running `fn` off the event loop; a handler with a body also
    gets the client's address, which the passphrase limiter counts against."""
    async def handler(request) -> Reply:
        try:
            args = (await _json(request), client_of(request)) if with_body else ()
        except ValueError as exc:
            return _error(400, str(exc))
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

ROUTES = (("GET", STATUS_PATH, handle_status), ("GET", POLICY_PATH, handle_policy_get),
          ("POST", POLICY_PATH, handle_policy_post), ("POST", AUDIT_PATH, handle_audit))

