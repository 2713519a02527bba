"""HTTP routes for protection status, the policy and the audit log (ComfyUI front end).

    GET  /consent_guard/status  -> enforce mode, hooks, lock, audit log health (no secrets)
    GET  /consent_guard/policy  -> {text, locked, path}
    POST /consent_guard/policy  {"text": TOML, "passphrase": ...} -> validated, then written;
                                 the admin passphrase is needed while the lock is on
    POST /consent_guard/audit   {"passphrase", "since", "decision", "limit"} -> records; always
                                 needs the admin passphrase (the log holds ids and hashes)

Registered by routes.register (see routes.py for how ComfyUI serves them). Wrong passphrases
count in the same limiter as the enrolment dialog's. Nothing here can turn the lock off: that
is `consent-guard admin unlock`, on the machine, by the admin.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Optional

from ..consent_guard import admin
from ..consent_guard.policy import POLICY_FILENAME, PolicyError
from .comfy_bridge import ConsentGuardError, home
from .routes import LIMITER, Reply, _error, _too_many

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
    try:
        from .image_nodes import get_engine
        audit = get_engine().audit
        body["audit"] = None if audit is None else {"healthy": audit.healthy,
                                                     "problem": audit.last_error}
        body["engine_problem"] = None
    except ConsentGuardError as exc:
        body["audit"], body["engine_problem"] = None, str(exc)
    return Reply(200, body)


async def _json(request) -> dict:
    try:
        data = await request.json()
    except Exception:
        raise ValueError("The request body must be JSON.")
    if not isinstance(data, dict):
        raise ValueError("The request body must be a JSON object.")
    return data


def _admin_ok(passphrase: Optional[str], what: str, always: bool = False) -> Optional[Reply]:
    """None when the change may go ahead; else the reply refusing it."""
    retry = LIMITER.retry_after()
    if retry:
        return _too_many(retry)
    if always:
        if not admin.state(home()).has_passphrase:
            return _error(403, f"{what} is for the admin: set an admin passphrase first "
                               f"(`consent-guard admin set-passphrase`).")
        if admin.verify(home(), passphrase):
            LIMITER.reset()
            return None
        LIMITER.failed()
        return _error(403, f"Wrong admin passphrase: {what} refused.")
    try:
        admin.require_admin(home(), passphrase, what)
    except admin.AdminLocked as exc:
        if passphrase:
            LIMITER.failed()
        log.warning("Consent Guard: %s", exc)
        return _error(403, str(exc), locked=True)
    return None


def policy_get_sync() -> Reply:
    path = home() / POLICY_FILENAME
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else None
    except OSError as exc:
        return _error(500, f"The policy {path} cannot be read: {exc}")
    return Reply(200, {"ok": True, "path": str(path), "text": text,
                       "locked": admin.is_locked(home())})


def policy_post_sync(data: dict) -> Reply:
    text, passphrase = data.get("text"), data.get("passphrase")
    if not isinstance(text, str) or len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        return _error(400, f"Send the policy as 'text' (TOML, at most {MAX_POLICY_BYTES} bytes).")
    refused = _admin_ok(passphrase if isinstance(passphrase, str) else None,
                        "changing the policy")
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
    log.warning("Consent Guard: the policy was changed from the ComfyUI front end")
    return Reply(200, {"ok": True, "path": str(path)})


def audit_sync(data: dict) -> Reply:
    refused = _admin_ok(data.get("passphrase") if isinstance(data.get("passphrase"), str)
                        else None, "reading the audit log", always=True)
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
    async def handler(request) -> Reply:
        try:
            args = (await _json(request),) if with_body else ()
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

