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

Every refusal carries a "code" besides its message: "passphrase_missing" (type it) and
"passphrase_wrong" (it was checked and is wrong) are told apart, "not_set_up" when there is no
admin passphrase yet, and set-up's own codes (setup.py).

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
import os
from typing import Optional

from ..consent_guard import admin, expect, setup
from ..consent_guard.policy import POLICY_FILENAME, PolicyError
from . import routes
from .comfy_bridge import ConsentGuardError, home
from .routes import (NOT_SET_UP, PASSPHRASE_MISSING, PASSPHRASE_WRONG, Reply, _error,
                     _too_many, client_of, running_setup)

log = logging.getLogger("consent_guard")

STATUS_PATH = "/consent_guard/status"
POLICY_PATH = "/consent_guard/policy"
AUDIT_PATH = "/consent_guard/audit"
SETUP_PATH = "/consent_guard/setup"
LOCK_PATH = "/consent_guard/lock"
_models_cache: dict = {}
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
    body["set_up"] = st.has_passphrase
    body["models"] = _models(engine)
    return Reply(200, body)


def _models(engine) -> list:
    """[{name, ok, error?}] for the models in the manifest, resolved (and hashed) once per
    policy's [models.paths]: the panel shows which ones this ComfyUI can use."""
    try:
        from ..consent_guard.models import ModelResolver, describe
        from ..consent_guard.policy import load_policy
        from .comfy_bridge import MODEL_FOLDER
        import folder_paths

        policy = engine.policy if engine is not None else load_policy(home=home())
        dirs = tuple(folder_paths.get_folder_paths(MODEL_FOLDER))
        key = (tuple(sorted(policy.model_paths.items())), dirs)
        if key not in _models_cache:
            resolver = ModelResolver(policy.model_paths, dirs)
            _models_cache.clear()
            _models_cache[key] = [{k: r[k] for k in ("name", "ok", "error") if k in r}
                                  for r in describe(resolver, sorted(resolver.manifest))]
        return _models_cache[key]
    except Exception as exc:
        return [{"name": "(models)", "ok": False, "error": f"{type(exc).__name__}: {exc}"}]


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
        return _error(403, f"{what} is for the admin: do the first-run set-up first (the "
                           f"Consent Guard panel, or `consent-guard admin set-passphrase`).",
                      code=NOT_SET_UP)
    if not always and not st.locked:
        return None
    if not passphrase:
        return _error(403, (f"Consent Guard is locked by the admin: {what} needs the admin "
                            f"passphrase. Type it in the admin passphrase field." if st.locked
                            else f"{what[0].upper()}{what[1:]} needs the admin passphrase: "
                                 f"type it in the admin passphrase field."),
                      code=PASSPHRASE_MISSING, locked=st.locked)
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
    if st.problem:
        message = f"Consent Guard is locked and {st.problem}; {what} was refused."
    else:
        message = f"Wrong admin passphrase: {what} was refused. Check it and type it again."
    log.warning("Consent Guard: %s", message)
    return _error(403, message, code=PASSPHRASE_WRONG, locked=st.locked)


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


def setup_get_sync() -> Reply:
    return Reply(200, {"ok": True, **setup.describe(home())})


def is_loopback(client: str) -> bool:
    """The peer is this machine (127.0.0.0/8, ::1, an IPv4-mapped loopback). Behind a reverse
    proxy on the same machine every peer looks local: such a set-up must use the CLI."""
    import ipaddress

    try:
        addr = ipaddress.ip_address(client.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool((mapped or addr).is_loopback)


def setup_post_sync(data: dict, client: str = "") -> Reply:
    """The first-run set-up. A registry passphrase that does not open the registry counts as a
    wrong guess in the limiter (set-up is open to anyone until it is done, so that guess is
    rate-limited like every other)."""
    if not is_loopback(client):
        # Until set-up is done nobody holds the admin passphrase, so the first to send one
        # becomes the admin: on a ComfyUI started with --listen, that could be anyone on the
        # network. Only the machine itself may do it.
        log.warning("Consent Guard: set-up refused from %s (not this machine)", client)
        return _error(403, "Set Consent Guard up on the computer ComfyUI runs on: open ComfyUI "
                      "there (http://127.0.0.1:<port>), or run `consent-guard setup` there.",
                      code="setup_local_only")
    flags = {k: data.get(k) for k in ("enforce", "locked")}
    if not all(isinstance(v, bool) for v in flags.values()):
        return _error(400, "Send enforce and locked as true or false.", code="bad_request")
    texts = {k: data.get(k) for k in ("passphrase", "passphrase_confirm",
                                      "registry_passphrase")}
    if any(v is not None and not isinstance(v, str) for v in texts.values()):
        return _error(400, "Passphrases must be text.", code="bad_request")
    ticket, retry = routes.LIMITER.begin(client)
    if ticket is None:
        return _too_many(retry)
    outcome = routes.UNCHECKED
    try:
        result = setup.run_setup(home(), texts["passphrase"], texts["passphrase_confirm"],
                                 registry_passphrase=texts["registry_passphrase"] or None,
                                 source="comfyui panel", **flags)
    except setup.SetupError as exc:
        if exc.code == setup.REGISTRY_PASSPHRASE_WRONG:
            outcome = routes.WRONG
        return _error(exc.status, str(exc), code=exc.code, done=exc.done)
    finally:
        routes.LIMITER.end(ticket, outcome)
    return Reply(200, {"ok": True, **result.to_dict()})


def lock_post_sync(data: dict, client: str = "") -> Reply:
    locked = data.get("locked")
    if not isinstance(locked, bool):
        return _error(400, "Send locked as true or false.", code="bad_request")
    what = "locking Consent Guard" if locked else "unlocking Consent Guard"
    refused = _admin_ok(data.get("passphrase") if isinstance(data.get("passphrase"), str)
                        else None, what, always=True, client=client)
    if refused is not None:
        return refused
    try:
        admin.set_locked(home(), locked, data["passphrase"])
    except admin.AdminError as exc:
        return _error(500, str(exc))
    log.warning("Consent Guard: %s from the ComfyUI front end", "locked" if locked
                else "unlocked")
    return Reply(200, {"ok": True, "locked": locked})


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
handle_setup_get = _sync_handler(setup_get_sync, False)
handle_setup_post = _sync_handler(setup_post_sync, True)
handle_lock = _sync_handler(lock_post_sync, True)

ROUTES = (("GET", STATUS_PATH, handle_status), ("GET", POLICY_PATH, handle_policy_get),
          ("POST", POLICY_PATH, handle_policy_post), ("POST", AUDIT_PATH, handle_audit),
          ("GET", SETUP_PATH, handle_setup_get), ("POST", SETUP_PATH, handle_setup_post),
          ("POST", LOCK_PATH, handle_lock))

