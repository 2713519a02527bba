"""HTTP routes for the ComfyUI front end's "Enrol protected person" dialog (web/js/).

    GET  /consent_guard/identities/status   -> {registry_exists, enrolled, problem}
    (GET /consent_guard/status, admin_routes.py, reports running_setup(): home, policy, registry)
    POST /consent_guard/identities/enroll   multipart/form-data, admin passphrase required

How ComfyUI takes routes from a custom node (ComfyUI a125cd84, version 0.3.64, server.py and
main.py): PromptServer.__init__ sets `PromptServer.instance` and `self.routes =
web.RouteTableDef()`; main.py builds the server, then imports the custom nodes
(nodes.init_extra_nodes), then calls `prompt_server.add_routes()`, which adds every route of
`self.routes` twice, as /path and /api/path (the front end's `api.fetchApi` uses /api). So a
route added to `PromptServer.instance.routes` while this package is imported is served. The same server's origin_only_middleware refuses requests
whose Origin differs from Host, so another web site cannot make a visitor's browser post here.

The status route is open to anyone who can reach ComfyUI: it gives a count, never a name and
never anything biometric. The enrol route needs the admin passphrase: after the first-run
set-up (consent_guard/setup.py) it also seals the registry, so one field does both; a registry
sealed with another passphrase (made before set-up, or by the command line) takes that one in
the optional field "registry_passphrase", and the reply's code "registry_passphrase_needed"
says when it is needed. Refusals carry a "code": "passphrase_missing" and "passphrase_wrong"
are told apart, so the panel can say "type it" or "that was wrong"; wrong passphrases are
rate-limited per client and globally (PassphraseLimiter, an attempt reserved before its slow
check) and the passphrase is never echoed or logged. A new registry is recorded in the admin's
record (consent_guard/expect.py), so that its absence later refuses instead of allowing.
Photos are read into memory (request.multipart(), not request.post(), which spools parts over
1 MiB to a temp file), decoded, embedded and dropped: nothing of them is written to disk.

The logic (the checks, the limiter, photo decoding, enrolment, the refusal codes) is
consent_guard/admin_api.py, shared with the A1111/Forge adapter; this module reads aiohttp's
request, runs the shared call off the event loop, and gives it ComfyUI's Site (SITE: the
home, engine and model folders of nodes/comfy_bridge.py, the enforce hooks' status). The
handlers are plain async functions of the request that return a Reply, so tests can call
them with a stand-in request; `register(server)` wraps them into aiohttp handlers.
"""
from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import folder_paths

from ..consent_guard import admin_api
from ..consent_guard.admin_api import (  # noqa: F401 - the shared names, for this package
    MAX_PHOTO_BYTES, MAX_PHOTOS, NOT_SET_UP, PASSPHRASE_MISSING, PASSPHRASE_WRONG,
    REGISTRY_PASSPHRASE_NEEDED, EnrolForm, FormError, PassphraseLimiter, Photo, PhotoRefused,
    Reply, Site, decode_photo, is_loopback)
from ..consent_guard.policy import load_policy
from ..consent_guard.registry import REGISTRY_FILENAME, registry_paths
from .comfy_bridge import MODEL_FOLDER, ConsentGuardError, get_engine, home, insightface_dirs

log = logging.getLogger("consent_guard")

STATUS_PATH = "/consent_guard/identities/status"
ENROLL_PATH = "/consent_guard/identities/enroll"

MAX_TOTAL_BYTES = 100 * 1024 * 1024  # all photos of one request (ComfyUI's default upload cap)
MAX_FIELD_BYTES = 4096  # a text field
TEXT_FIELDS = ("passphrase", "passphrase_confirm", "registry_passphrase", "name", "aliases",
               "scope", "consent_by", "on_behalf_of", "consent_date", "note")
CHUNK = 256 * 1024
_error, _too_many = admin_api.error, admin_api.too_many

# The process's one limiter (admin_api.LIMITER), named here for tools and tests that reset it;
# the handlers always use admin_api.LIMITER itself.
LIMITER = admin_api.LIMITER
# One enrolment at a time, off the server's event loop, on its own thread, so a queue of
# enrolments never holds up the threads of the loop's default executor.
_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="consent_guard_enrol")


def _enforce_status() -> dict:
    """The enforce hooks' state (nodes/enforce.py) for the status reply."""
    from . import enforce

    return enforce.status()


# What the shared admin actions need from ComfyUI (admin_api.Site). Callables, looked up on
# each use, so a rebuilt engine or a new model folder is seen at once.
SITE = Site(home=home, engine=lambda: get_engine(),
            model_dirs=lambda: [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER)],
            insightface_dirs=insightface_dirs, source="comfyui panel", hooks=_enforce_status,
            ui_name="ComfyUI", panel="the Consent Guard panel")


def client_of(request) -> str:
    """The client a passphrase attempt is counted against: the peer's address as aiohttp sees
    it (behind a reverse proxy, the proxy's: then the global limit is what applies)."""
    return str(getattr(request, "remote", None) or "unknown")


# -- reading the form ------------------------------------------------------------------------

async def _read_capped(part, cap: int) -> Optional[bytes]:
    """The part's bytes, or None (the rest drained) when it is longer than `cap`."""
    buf = bytearray()
    while True:
        chunk = await part.read_chunk(CHUNK)
        if not chunk:
            return bytes(buf)
        buf.extend(chunk)
        if len(buf) > cap:
            await part.release()
            return None


def _source_name(filename: Optional[str], n: int) -> str:
    name = os.path.basename((filename or "").replace("\\", "/")).strip()
    return name[:120] if name else f"photo {n}"


async def read_form(request) -> Tuple[Dict[str, str], List[Photo]]:
    """Text fields and photo uploads from a multipart/form-data body, read part by part into
    memory, each within its size limit."""
    if request.content_type != "multipart/form-data":
        raise FormError("Send the form as multipart/form-data.")
    try:
        reader = await request.multipart()
    except Exception as exc:
        raise FormError(f"Unreadable form: {exc}") from None
    fields: Dict[str, str] = {}
    uploads: List[Photo] = []
    total = 0
    while True:
        try:
            part = await reader.next()
        except Exception as exc:  # a malformed body (aiohttp raises ValueError and others)
            raise FormError(f"Unreadable form: {exc}") from None
        if part is None:
            break
        name = getattr(part, "name", None)
        if name == "photo":
            source = _source_name(getattr(part, "filename", None), len(uploads) + 1)
            if len(uploads) >= MAX_PHOTOS:
                await part.release()
                uploads.append(Photo(source, None, f"not read: at most {MAX_PHOTOS} photos "
                                                   f"at a time"))
                continue
            data = await _read_capped(part, min(MAX_PHOTO_BYTES, MAX_TOTAL_BYTES - total))
            if data is None:
                too_big = f"file over {MAX_PHOTO_BYTES // 2 ** 20} MB" if \
                    MAX_TOTAL_BYTES - total >= MAX_PHOTO_BYTES else \
                    f"the photos together are over {MAX_TOTAL_BYTES // 2 ** 20} MB"
                uploads.append(Photo(source, None, f"not read: {too_big}"))
                continue
            if not data and not getattr(part, "filename", None):
                continue  # a browser form's empty file input
            total += len(data)
            uploads.append(Photo(source, data))
        elif name in TEXT_FIELDS:
            data = await _read_capped(part, MAX_FIELD_BYTES)
            if data is None:
                raise FormError(f"The field {name} is too long (at most {MAX_FIELD_BYTES} "
                                f"bytes).")
            fields[name] = data.decode("utf-8", errors="replace")
        else:
            await part.release()
    return fields, uploads


def parse_form(fields: Dict[str, str], uploads: List[Photo]) -> EnrolForm:
    """The shared enrolment form from the dialog's fields; admin_api.enrol checks them."""
    return EnrolForm(
        passphrase=fields.get("passphrase", ""), name=fields.get("name", ""),
        scope=fields.get("scope", "").strip(), consent_by=fields.get("consent_by", ""),
        photos=uploads, aliases=fields.get("aliases", ""),
        on_behalf_of=fields.get("on_behalf_of", ""),
        consent_date=fields.get("consent_date", ""), note=fields.get("note", ""),
        registry_passphrase=fields.get("registry_passphrase", ""),
        passphrase_confirm=fields.get("passphrase_confirm"))


# -- the handlers ----------------------------------------------------------------------------

async def handle_enroll(request) -> Reply:
    client = client_of(request)
    retry = admin_api.LIMITER.retry_after(client)  # before reading the body: costs nothing
    if retry:
        return _too_many(retry)
    try:
        form = parse_form(*await read_form(request))
    except FormError as exc:
        return _error(400, str(exc), code=exc.code)
    try:
        return await asyncio.get_running_loop().run_in_executor(
            _EXECUTOR, admin_api.enrol, SITE, form, client)
    except Exception as exc:  # never the passphrase: it is in `form`, not in the message
        log.exception("Consent Guard: enrolment failed")
        return _error(500, f"Enrolment failed: {type(exc).__name__}: {exc}")


def status_sync() -> Reply:
    """Whether a registry exists and how many people it protects (null when ComfyUI cannot
    open it), for the enrol dialog. Never names."""
    try:
        engine = get_engine()
    except ConsentGuardError as exc:
        try:
            db = registry_paths(load_policy(home=home()), home())[0]
        except Exception:
            db = home() / REGISTRY_FILENAME
        return Reply(200, {"registry_exists": db.exists(), "enrolled": None,
                           "problem": str(exc)})
    db = registry_paths(engine.policy, home())[0]
    enrolled = len(engine.registry.identities()) if engine.registry is not None else \
        (None if db.exists() else 0)
    return Reply(200, {"registry_exists": db.exists(), "enrolled": enrolled, "problem": None})


async def handle_status(request) -> Reply:
    try:
        return await asyncio.get_running_loop().run_in_executor(None, status_sync)
    except Exception as exc:
        log.exception("Consent Guard: status failed")
        return _error(500, f"{type(exc).__name__}: {exc}")


# -- registration ----------------------------------------------------------------------------

def register(server) -> bool:
    """Add the routes to a ComfyUI PromptServer (its `routes`, a web.RouteTableDef). Returns
    False when they are there already (this package imported twice)."""
    from aiohttp import web  # ComfyUI's own dependency; only needed here

    def wrap(handler):
        async def aiohttp_handler(request):
            reply = await handler(request)
            return web.json_response(reply.body, status=reply.status,
                                     headers={"Cache-Control": "no-store", **reply.headers})
        aiohttp_handler.__name__ = handler.__name__
        return aiohttp_handler

    from .admin_routes import ROUTES

    taken = {(getattr(r, "method", None), getattr(r, "path", None)) for r in server.routes}
    if ("POST", ENROLL_PATH) in taken:
        return False
    server.routes.get(STATUS_PATH)(wrap(handle_status))
    server.routes.post(ENROLL_PATH)(wrap(handle_enroll))
    for method, path, handler in ROUTES:
        (server.routes.get if method == "GET" else server.routes.post)(path)(wrap(handler))
    return True


def register_with_comfyui() -> bool:
    """Register on the running ComfyUI server, if there is one (none under the tests'
    stand-ins, or when ComfyUI's nodes are imported without a server)."""
    try:
        import server as comfy_server  # ComfyUI's server.py, on sys.path when ComfyUI runs
    except ImportError:
        return False
    instance = getattr(getattr(comfy_server, "PromptServer", None), "instance", None)
    if instance is None or not hasattr(instance, "routes"):
        return False
    try:
        return register(instance)
    except Exception:  # the nodes must still load; only the dialog is missing
        log.exception("Consent Guard: could not add the enrolment routes to ComfyUI")
        return False
