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

The handlers are plain async functions of the request that return a Reply, so tests can call
them with a stand-in request; `register(server)` wraps them into aiohttp handlers.
"""
from __future__ import annotations

import asyncio
import datetime
import io
import logging
import math
import os
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

import folder_paths

from ..consent_guard import admin, expect
from ..consent_guard.admin import AdminLocked, require_admin
from ..consent_guard.faces.enrol import PhotoCheck
from ..consent_guard.identities import EnrolmentRefused, enrol_person
from ..consent_guard.models import ModelError
from ..consent_guard.policy import POLICY_FILENAME, load_policy
from ..consent_guard.registry import (REGISTRY_FILENAME, SCOPES, Consent, LockedError,
                                      RegistryError, registry_paths)
from .comfy_bridge import MODEL_FOLDER, ConsentGuardError, get_engine, home, insightface_dirs

log = logging.getLogger("consent_guard")

STATUS_PATH = "/consent_guard/identities/status"
ENROLL_PATH = "/consent_guard/identities/enroll"

MAX_PHOTO_BYTES = 40 * 1024 * 1024  # one photo file
MAX_TOTAL_BYTES = 100 * 1024 * 1024  # all photos of one request (ComfyUI's default upload cap)
MAX_PHOTOS = 10
MAX_FIELD_BYTES = 4096  # a text field
MIN_NEW_PASSPHRASE = 8  # as the command line asks when it creates a registry
TEXT_FIELDS = ("passphrase", "passphrase_confirm", "registry_passphrase", "name", "aliases",
               "scope", "consent_by", "on_behalf_of", "consent_date", "note")
SECRET_FIELDS = ("passphrase", "passphrase_confirm", "registry_passphrase")
# What a refusal's "code" says, so the front end can tell "type it" from "that was wrong"
# (and tests need no message text). Set-up adds its own (consent_guard/setup.py).
PASSPHRASE_MISSING, PASSPHRASE_WRONG = "passphrase_missing", "passphrase_wrong"
REGISTRY_PASSPHRASE_NEEDED = "registry_passphrase_needed"
NOT_SET_UP = "not_set_up"
CHUNK = 256 * 1024


@dataclass
class Reply:
    status: int
    body: dict
    headers: Dict[str, str] = field(default_factory=dict)


def _error(status: int, message: str, **extra) -> Reply:
    return Reply(status, {"ok": False, "error": message, **extra})


WRONG, RIGHT, UNCHECKED = "wrong", "right", "unchecked"  # how a reserved check ended


class PassphraseLimiter:
    """Limits wrong admin passphrases per client (remote address) and for the whole process.

    A client gets `max_failures` wrong passphrases within `window` seconds; then that client
    alone is answered 429 for `lockout` seconds, so one guesser cannot lock anyone else out.
    All clients together get `global_failures` within the window; past that, attempts from
    anyone are spaced `global_spacing` seconds apart until the window clears. A guesser with
    many addresses (or everyone behind one reverse proxy) is slowed to that pace, never locked
    out for longer than one spacing, and the command line on the machine always works. An
    address that gave the right passphrase within `trust_for` seconds skips that spacing (its
    own limit still holds), so a flood of guesses cannot starve the admin of slots.

    An attempt is reserved before its slow scrypt check runs (`begin`) and settled after it
    (`end`): checking the limit and counting the attempt are one step under one lock, and a
    pending attempt counts as a failure until it ends. So 40 concurrent guesses get at most
    `max_failures` checks, however the server's threads interleave them.
    """

    def __init__(self, max_failures: int = 5, window: float = 60.0, lockout: float = 60.0,
                 global_failures: int = 20, global_spacing: float = 3.0,
                 trust_for: float = 24 * 3600.0, clock=time.monotonic):
        self.max_failures, self.window, self.lockout, self.clock = \
            max_failures, window, lockout, clock
        self.global_failures, self.global_spacing = global_failures, global_spacing
        self.trust_for = trust_for
        self._clients: Dict[str, _Client] = {}
        self._trusted: Dict[str, float] = {}  # address -> until when it skips the spacing
        self._global: deque = deque()
        self._global_pending = 0
        self._next_slot = 0.0
        self._lock = threading.Lock()

    def _client(self, client: str, now: float) -> "_Client":
        for old in [k for k, c in self._clients.items() if c.idle(now, self.window)]:
            del self._clients[old]  # forget clients with nothing left to remember
        for old in [k for k, until in self._trusted.items() if until <= now]:
            del self._trusted[old]
        while self._global and self._global[0] <= now - self.window:
            self._global.popleft()
        state = self._clients.setdefault(client, _Client())
        state.prune(now, self.window)
        return state

    def retry_after(self, client: str = "") -> int:
        """Seconds until `client` may try again; 0 when it may try now (not reserved)."""
        with self._lock:
            now = self.clock()
            return self._wait(client, self._client(client, now), now)

    def _wait(self, client: str, state: "_Client", now: float) -> int:
        if state.locked_until > now:
            return max(1, math.ceil(state.locked_until - now))
        if len(state.failures) + state.pending >= self.max_failures:
            return 1  # its attempts in flight may use up its tries: ask again shortly
        if self._over_global() and self._next_slot > now and client not in \
                self._trusted:
            return max(1, math.ceil(self._next_slot - now))
        return 0

    def _over_global(self) -> bool:
        return len(self._global) + self._global_pending >= self.global_failures

    def begin(self, client: str = "") -> Tuple[Optional[str], int]:
        """Reserve one passphrase check for `client`: (ticket, 0), or (None, seconds to wait).
        Every ticket must be given back with end()."""
        with self._lock:
            now = self.clock()
            state = self._client(client, now)
            wait = self._wait(client, state, now)
            if wait:
                return None, wait
            if self._over_global() and client not in self._trusted:
                self._next_slot = now + self.global_spacing
            state.pending += 1
            self._global_pending += 1
            return client, 0

    def end(self, ticket: str, outcome: str) -> None:
        """Settle a reserved check. WRONG counts; RIGHT (the passphrase was verified) clears
        the client's count, never the global one; UNCHECKED (refused before any passphrase
        was checked, e.g. no readable photo) only gives the reservation back, so a request
        that checks nothing can never reset a guesser's count."""
        with self._lock:
            now = self.clock()
            state = self._client(ticket, now)
            state.pending = max(0, state.pending - 1)
            self._global_pending = max(0, self._global_pending - 1)
            if outcome == RIGHT:
                state.failures.clear()
                self._trusted[ticket] = now + self.trust_for
            if outcome != WRONG:
                return
            state.failures.append(now)
            self._global.append(now)
            if len(state.failures) >= self.max_failures:
                state.locked_until = now + self.lockout
                state.failures.clear()

    def reset(self) -> None:
        with self._lock:
            self._clients.clear()
            self._trusted.clear()
            self._global.clear()
            self._global_pending = 0
            self._next_slot = 0.0


@dataclass
class _Client:
    failures: deque = field(default_factory=deque)
    pending: int = 0
    locked_until: float = 0.0

    def prune(self, now: float, window: float) -> None:
        while self.failures and self.failures[0] <= now - window:
            self.failures.popleft()

    def idle(self, now: float, window: float) -> bool:
        self.prune(now, window)
        return not self.failures and not self.pending and self.locked_until <= now


LIMITER = PassphraseLimiter()
# One enrolment at a time, off the server's event loop: two first enrolments cannot race to
# create the registry (the limiter's reservation, not this thread, keeps passphrase checks
# within the limit). Its own thread, so a queue of enrolments never holds up
# the threads of the loop's default executor.
_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="consent_guard_enrol")


def _too_many(seconds: int) -> Reply:
    return Reply(429, {"ok": False, "error": f"Too many wrong passphrases: try again in "
                                             f"{seconds} s.", "retry_after": seconds},
                 {"Retry-After": str(seconds)})


# -- reading the form ------------------------------------------------------------------------

class FormError(ValueError):
    """The request is not a form this route can take; the message says why (400)."""

    def __init__(self, message: str, code: str = "bad_form"):
        super().__init__(message)
        self.code = code


@dataclass
class Upload:
    source: str  # the file name as sent (no folders), or "photo N"
    data: Optional[bytes]  # None when refused before decoding
    reason: str = ""


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


async def read_form(request) -> Tuple[Dict[str, str], List[Upload]]:
    """Text fields and photo uploads from a multipart/form-data body, read part by part into
    memory, each within its size limit."""
    if request.content_type != "multipart/form-data":
        raise FormError("Send the form as multipart/form-data.")
    try:
        reader = await request.multipart()
    except Exception as exc:
        raise FormError(f"Unreadable form: {exc}") from None
    fields: Dict[str, str] = {}
    uploads: List[Upload] = []
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
                uploads.append(Upload(source, None, f"not read: at most {MAX_PHOTOS} photos "
                                                    f"at a time"))
                continue
            data = await _read_capped(part, min(MAX_PHOTO_BYTES, MAX_TOTAL_BYTES - total))
            if data is None:
                too_big = f"file over {MAX_PHOTO_BYTES // 2 ** 20} MB" if \
                    MAX_TOTAL_BYTES - total >= MAX_PHOTO_BYTES else \
                    f"the photos together are over {MAX_TOTAL_BYTES // 2 ** 20} MB"
                uploads.append(Upload(source, None, f"not read: {too_big}"))
                continue
            if not data and not getattr(part, "filename", None):
                continue  # a browser form's empty file input
            total += len(data)
            uploads.append(Upload(source, data))
        elif name in TEXT_FIELDS:
            data = await _read_capped(part, MAX_FIELD_BYTES)
            if data is None:
                raise FormError(f"The field {name} is too long (at most {MAX_FIELD_BYTES} "
                                f"bytes).")
            fields[name] = data.decode("utf-8", errors="replace")
        else:
            await part.release()
    return fields, uploads


@dataclass
class EnrolForm:
    passphrase: str
    passphrase_confirm: Optional[str]
    registry_passphrase: Optional[str]  # only where the registry has another passphrase
    name: str
    aliases: List[str]
    scope: str
    consent: Consent
    uploads: List[Upload]


def parse_form(fields: Dict[str, str], uploads: List[Upload]) -> EnrolForm:
    """Check the fields; raise FormError naming what is missing or wrong."""
    text = {k: fields.get(k, "").strip() for k in TEXT_FIELDS if k not in SECRET_FIELDS}
    missing = [label for key, label in (("name", "name"), ("scope", "scope"),
                                        ("consent_by", "consent given by"))
               if not text[key]]
    if not fields.get("passphrase"):
        missing.append("admin passphrase")
    if not uploads:
        missing.append("photo")
    if missing:
        raise FormError("Missing: " + ", ".join(missing) + ".",
                        PASSPHRASE_MISSING if "admin passphrase" in missing else "missing")
    if text["scope"] not in SCOPES:
        raise FormError(f"scope must be one of {', '.join(SCOPES)}.")
    date = text["consent_date"] or time.strftime("%Y-%m-%d")
    try:
        datetime.date.fromisoformat(date)
    except ValueError:
        raise FormError("consent_date must be a date as YYYY-MM-DD.") from None
    if len(text["name"]) > 200:
        raise FormError("The name is too long (at most 200 characters).")
    aliases = [a.strip() for a in text["aliases"].split(",") if a.strip()]
    return EnrolForm(
        passphrase=fields["passphrase"], passphrase_confirm=fields.get("passphrase_confirm"),
        registry_passphrase=fields.get("registry_passphrase") or None, name=text["name"], aliases=aliases, scope=text["scope"],
        consent=Consent(text["consent_by"], text["on_behalf_of"], date, text["note"]),
        uploads=uploads)


class PhotoRefused(ValueError):
    """An upload that is not a usable image; the message says why."""


def decode_photo(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 pixels of an uploaded photo, turned upright by its EXIF orientation; raises
    PhotoRefused with a reason a person can act on."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise PhotoRefused(f"too large: {w}x{h}, over the policy limit of "
                                   f"{max_pixels / 1e6:.0f} MP")
            img.load()
            img = ImageOps.exif_transpose(img)
            return np.asarray(img.convert("RGB"))
    except PhotoRefused:
        raise
    except UnidentifiedImageError:
        raise PhotoRefused("not an image, or a format Pillow cannot read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PhotoRefused("refused: too many pixels (decompression bomb)") from None
    except Exception as exc:  # truncated or corrupt: OSError, SyntaxError, ValueError, ...
        raise PhotoRefused(f"corrupt or truncated image ({type(exc).__name__})") from None


# -- the handlers ----------------------------------------------------------------------------

def _photo(source: str, ok: bool, reason: str) -> dict:
    return {"source": source, "ok": ok, "reason": reason}


def _policy():
    """The engine's policy; when the engine cannot be built only because the registry cannot be
    opened unattended (no key file), enrolment still works with the admin passphrase."""
    try:
        return get_engine().policy
    except ConsentGuardError as exc:
        try:
            return load_policy(home=home())
        except Exception:
            raise exc from None


def enrol_sync(form: EnrolForm, client: str = "") -> Reply:
    """Decode the photos and enrol; runs on the enrolment thread. The passphrase checks (the
    admin's while locked, the registry's) are one reserved attempt of `client`'s."""
    ticket, retry = LIMITER.begin(client)
    if ticket is None:
        return _too_many(retry)
    outcome = {"passphrase": UNCHECKED}
    try:
        return _enrol_checked(form, outcome)
    finally:
        LIMITER.end(ticket, outcome["passphrase"])


def _wrong_admin(what: str) -> Reply:
    return _error(403, f"Wrong admin passphrase: {what}. Check it and type it again.",
                  code=PASSPHRASE_WRONG, locked=admin.is_locked(home()))


def _enrol_checked(form: EnrolForm, outcome: dict) -> Reply:
    try:  # while the admin lock is on, the admin passphrase is needed too (the same field)
        require_admin(home(), form.passphrase, "enrolling someone")
    except AdminLocked as exc:
        outcome["passphrase"] = WRONG
        log.warning("Consent Guard: %s", exc)
        return _wrong_admin("nothing was enrolled")
    try:
        policy = _policy()
    except ConsentGuardError as exc:
        return _error(500, str(exc))
    db, _ = registry_paths(policy, home())
    admin_set = admin.state(home()).has_passphrase
    if not db.exists() and admin_set:  # after set-up a new registry gets the admin passphrase
        if not admin.verify(home(), form.passphrase):
            outcome["passphrase"] = WRONG
            return _wrong_admin("nothing was enrolled")
    elif not db.exists():  # no set-up yet: this passphrase will seal the new registry
        if form.passphrase_confirm is None or form.passphrase_confirm != form.passphrase:
            return _error(400, "No identity registry exists yet, so this enrolment creates one "
                               "with this passphrase: type it twice, the same both times.")
        if len(form.passphrase) < MIN_NEW_PASSPHRASE:
            return _error(400, f"Use an admin passphrase of at least {MIN_NEW_PASSPHRASE} "
                               f"characters.")

    photos: List[Optional[dict]] = []  # one per upload; None where enrol_person decides
    pixels, sources = [], []
    for up in form.uploads:
        if up.data is None:
            photos.append(_photo(up.source, False, up.reason))
            continue
        try:
            pixels.append(decode_photo(up.data, policy.max_pixels))
        except PhotoRefused as exc:
            photos.append(_photo(up.source, False, str(exc)))
            continue
        finally:
            up.data = None  # let the upload's bytes go
        sources.append(up.source)
        photos.append(None)

    def merged(checks: List[PhotoCheck]) -> List[dict]:
        """The decoded photos' checks (in order) put back among the refused uploads."""
        out, decoded = [], iter(zip(sources, checks))
        for p in photos:
            if p is None:
                source, check = next(decoded)
                p = _photo(source, check.ok, check.reason)
            out.append(p)
        return out

    if not pixels:
        return _error(400, "No photo could be read; nothing was enrolled.", photos=photos)
    try:
        result = enrol_person(
            policy, home(), form.registry_passphrase or form.passphrase, name=form.name,
            scope=form.scope,
            consent=form.consent, photos=pixels, aliases=form.aliases,
            model_dirs=[Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER)],
            insightface_dirs=insightface_dirs())
    except LockedError:
        outcome["passphrase"] = WRONG
        log.warning("Consent Guard: enrolment refused, wrong passphrase")
        if form.registry_passphrase:
            return _error(403, "Wrong registry passphrase: it does not open the identity "
                               "registry; nothing was enrolled.", code=PASSPHRASE_WRONG)
        if admin_set and admin.verify(home(), form.passphrase):
            outcome["passphrase"] = RIGHT
            return _error(403, "The admin passphrase is right, but the identity registry is "
                               "sealed with another passphrase: type that one under "
                               "\"Registry passphrase\"; nothing was enrolled.",
                          code=REGISTRY_PASSPHRASE_NEEDED)
        return _error(403, "Wrong admin passphrase: nothing was enrolled. Check it and type "
                           "it again.", code=PASSPHRASE_WRONG)
    except EnrolmentRefused as exc:
        return _error(400, "No photo was usable; nothing was enrolled. Use clear photos of "
                           "this person alone, face to the camera.", photos=merged(exc.checks))
    except ModelError as exc:
        return _error(500, f"The face models cannot run: {exc}")
    except RegistryError as exc:  # e.g. the name is already enrolled
        return _error(400, str(exc))
    outcome["passphrase"] = RIGHT  # it opened (or created) the registry
    _record_registry(policy)
    ident = result.identity
    log.info("Consent Guard: enrolled %s (scope %s) from the ComfyUI dialog", ident.id,
             ident.scope)
    return Reply(200, {"ok": True, "id": ident.id, "name": ident.name, "scope": ident.scope,
                       "photos": merged(result.checks), "backends": result.backends,
                       "notes": result.notes})


def client_of(request) -> str:
    """The client a passphrase attempt is counted against: the peer's address as aiohttp sees
    it (behind a reverse proxy, the proxy's: then the global limit is what applies)."""
    return str(getattr(request, "remote", None) or "unknown")


async def handle_enroll(request) -> Reply:
    client = client_of(request)
    retry = LIMITER.retry_after(client)  # before reading the body: refused tries cost nothing
    if retry:
        return _too_many(retry)
    try:
        form = parse_form(*await read_form(request))
    except FormError as exc:
        return _error(400, str(exc), code=exc.code)
    try:
        return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, enrol_sync, form, client)
    except Exception as exc:  # never the passphrase: it is in `form`, not in the message
        log.exception("Consent Guard: enrolment failed")
        return _error(500, f"Enrolment failed: {type(exc).__name__}: {exc}")


def _record_registry(policy) -> None:
    """After an enrolment: the admin's record now expects this registry (expect.py), so its
    absence later refuses instead of allowing. Logged, not fatal, when it cannot be written:
    the person is enrolled, and the key file beside the registry also marks that it exists."""
    db, key_file = registry_paths(policy, home())
    try:
        if "registry" not in expect.read(home()):
            expect.record_registry(home(), db, key_file)
    except (OSError, expect.ExpectationError) as exc:
        log.error("Consent Guard: the new registry was not recorded in %s: %s",
                  expect.expect_path(home()), exc)


def running_setup(engine=None) -> dict:
    """Which home, policy (path, sha256) and identity registry (path, how many people; "none"
    when there is none) this server checks with, for GET /consent_guard/status: `consent-guard
    doctor --url` compares them with the admin's own. Counts and hashes only, never a name."""
    where = home()
    policy = engine.policy if engine is not None else None
    if policy is None:
        try:
            policy = load_policy(home=where)
        except Exception:
            policy = None
    policy_path = Path(policy.source) if policy is not None and policy.source else \
        where / POLICY_FILENAME
    db = registry_paths(policy, where)[0] if policy is not None else where / REGISTRY_FILENAME
    if engine is not None and engine.registry is not None:
        count = len(engine.registry.identities())
    else:
        count = None if db.exists() else "none"
    return {"home": str(where),
            "policy": {"path": str(policy_path), "sha256": expect.sha256_of(policy_path),
                       "enforce": None if policy is None else bool(policy.enforce)},
            "registry": {"path": str(db), "exists": db.exists(), "identities": count}}


def status_sync() -> Reply:
    """Whether a registry exists and how many people it protects (null when ComfyUI cannot
    open it). Never names."""
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
