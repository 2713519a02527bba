"""Consent Guard's HTTP routes in an A1111 / Forge webui (FastAPI, added from on_app_started):

    GET  /consent_guard/status  -> set up, lock, enforce, models, how many protected, the
                                   audit log's health, which home/policy/registry (no secrets)
    GET  /consent_guard/policy  -> {text, locked, path}
    POST /consent_guard/policy  {"text": TOML, "passphrase"} -> validated, written, approved;
                                 the admin passphrase is needed while the lock is on
    POST /consent_guard/audit   {"passphrase", "since", "decision", "limit"}; always needs it
    POST /consent_guard/lock    {"locked": bool, "passphrase"}; always needs it
    GET  /consent_guard/setup   -> {set_up, registry_exists, ...}
    POST /consent_guard/setup   {"passphrase", "passphrase_confirm", "enforce", "locked",
                                 "registry_passphrase"?}: only from this machine (loopback)

The same paths, bodies and refusal codes as ComfyUI's (nodes/admin_routes.py), so one client
and `consent-guard doctor --url` work with both; the logic is consent_guard/admin_api.py, with
its passphrase limiter (per client address, and globally) shared with the Consent Guard tab.

Where A1111 and Forge differ from ComfyUI: webui's server has no origin check, so a POST is
taken only as application/json (a browser sends that cross-site only after a CORS preflight,
which webui answers only for origins the user allowed with --cors-allow-origins) and only when
an Origin header, if any, names the same host as the request. These routes are not behind
--api-auth (webui adds that only to its own /sdapi routes): everything that matters needs the
admin passphrase, and status holds no secret.

`handle(site, method, path, body, headers, client)` is a plain function (tests call it
without FastAPI); `register(app, site)` adds it to a FastAPI app.
"""
# No `from __future__ import annotations`: FastAPI finds the Request parameter of the endpoint
# by its annotation, which must be the class, not a string.
import json
import logging
from typing import Callable, Dict, Optional
from urllib.parse import urlsplit

from consent_guard import admin_api
from consent_guard.admin_api import Reply, Site, error

log = logging.getLogger("consent_guard")

PREFIX = "/consent_guard"
STATUS_PATH = PREFIX + "/status"
POLICY_PATH = PREFIX + "/policy"
AUDIT_PATH = PREFIX + "/audit"
LOCK_PATH = PREFIX + "/lock"
SETUP_PATH = PREFIX + "/setup"
MAX_BODY = admin_api.MAX_POLICY_BYTES + 4096
ROUTES = (("GET", STATUS_PATH), ("GET", POLICY_PATH), ("POST", POLICY_PATH),
          ("POST", AUDIT_PATH), ("POST", LOCK_PATH), ("GET", SETUP_PATH), ("POST", SETUP_PATH))


def _same_origin(headers: Dict[str, str]) -> bool:
    """No Origin header (curl, Python), or one whose host:port is the request's Host."""
    origin = headers.get("origin")
    if not origin:
        return True
    host = (headers.get("host") or "").lower()
    try:
        return bool(host) and urlsplit(origin).netloc.lower() == host
    except ValueError:
        return False


def _body(body: bytes, headers: Dict[str, str]) -> dict:
    ctype = (headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ValueError("Send the body as JSON (Content-Type: application/json).")
    if len(body) > MAX_BODY:
        raise ValueError(f"The body is too long (at most {MAX_BODY} bytes).")
    try:
        data = json.loads(body.decode("utf-8") or "null")
    except (UnicodeDecodeError, ValueError):
        raise ValueError("The request body must be JSON.") from None
    if not isinstance(data, dict):
        raise ValueError("The request body must be a JSON object.")
    return data


def handle(site: Site, method: str, path: str, body: bytes = b"",
           headers: Optional[Dict[str, str]] = None, client: str = "") -> Reply:
    """The reply to one request. `headers` lower-cased; `client` the peer's address."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    if (method, path) not in ROUTES:
        return error(404 if path not in {p for _, p in ROUTES} else 405, "No such route.")
    if method == "GET":
        if path == STATUS_PATH:
            return admin_api.status(site)
        if path == POLICY_PATH:
            return admin_api.policy_get(site)
        return admin_api.setup_describe(site)
    if not _same_origin(headers):
        log.warning("Consent Guard: %s refused: Origin %s is not this server", path,
                    headers.get("origin"))
        return error(403, "Refused: the request comes from another web site.",
                     code="cross_origin")
    try:
        data = _body(body, headers)
    except ValueError as exc:
        return error(400, str(exc), code=admin_api.BAD_REQUEST)
    secret = data.get("passphrase")
    if path == POLICY_PATH:
        return admin_api.policy_post(site, data.get("text"), secret, client)
    if path == AUDIT_PATH:
        return admin_api.audit(site, secret, data.get("since"), data.get("decision"),
                               data.get("limit") or 200, client)
    if path == LOCK_PATH:
        return admin_api.lock_post(site, data.get("locked"), secret, client)
    return admin_api.setup_post(site, secret, data.get("passphrase_confirm"),
                                data.get("enforce"), data.get("locked"),
                                data.get("registry_passphrase"), client)


def register(app, site: Callable[[], Site]) -> bool:
    """Add the routes to a FastAPI app (webui's, from on_app_started). `site` gives the Site
    at request time. False when they are there already (on_app_started called again)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    taken = {getattr(r, "path", None) for r in getattr(app, "routes", [])}
    if STATUS_PATH in taken:
        return False

    async def endpoint(request: Request):
        body = await request.body() if request.method == "POST" else b""
        client = request.client.host if request.client else "unknown"
        try:  # passphrase checks (scrypt) and files: off the event loop
            reply = await run_in_threadpool(handle, site(), request.method, request.url.path,
                                            body, dict(request.headers), client)
        except Exception as exc:  # never a passphrase: none is in any message
            log.exception("Consent Guard: %s failed", request.url.path)
            reply = error(500, f"{type(exc).__name__}: {exc}")
        return JSONResponse(reply.body, status_code=reply.status,
                            headers={"Cache-Control": "no-store", **reply.headers})

    for method, path in ROUTES:
        app.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
    return True


def on_app_started(demo, app) -> None:
    """script_callbacks.on_app_started(demo, app): demo is None with --nowebui."""
    from .ui_tab import default_site

    if register(app, lambda: default_site("a1111 api")):
        log.info("Consent Guard: routes added under %s", PREFIX)
