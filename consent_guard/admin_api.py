"""The admin actions of a UI, without the UI: status, first-run set-up, enrolment, policy,
audit log and lock, each one call that returns a Reply (an HTTP status and a JSON-able body).

Why here: both adapters serve the same actions, and one copy of their logic keeps their
rules, limits and refusal codes the same. ComfyUI's routes (nodes/routes.py,
nodes/admin_routes.py) and the A1111/Forge adapter (a1111_adapter/ui_tab.py for its gradio
tab, a1111_adapter/api_routes.py for its FastAPI routes) only read their requests (aiohttp,
gradio, FastAPI), call these, and send the Reply back. The semantics:
- every refusal has a "code": "passphrase_missing" (type it) and "passphrase_wrong" (it was
  checked and is wrong) are told apart, "not_set_up" before any admin passphrase exists,
  "registry_passphrase_needed", "setup_local_only", and set-up's own (setup.py);
- wrong passphrases are rate-limited per client and globally by the one PassphraseLimiter of
  the process (an attempt is reserved before its slow scrypt check); a request with no
  passphrase guesses nothing and is not counted;
- while the admin lock is on, changing the policy or enrolling needs the admin passphrase;
  reading the audit log and (un)locking always need it; set-up is refused once done and, over
  HTTP, from any peer but this machine (the first to set up becomes the admin);
- passphrases are never echoed or logged.

The UI's surroundings come in a Site: where the home is, how to get the UI's engine, where
its model files are. Nothing here imports a UI module.
"""
from __future__ import annotations

import datetime
import io
import logging
import math
import os
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import admin, expect, setup
from .faces.enrol import PhotoCheck  # noqa: F401 - for test doubles of enrol_person
from .identities import EnrolmentRefused, enrol_person
from .models import ModelError
from .policy import POLICY_FILENAME, PolicyError, load_policy
from .registry import LockedError, RegistryError

log = logging.getLogger("consent_guard")

PASSPHRASE_MISSING, PASSPHRASE_WRONG = "passphrase_missing", "passphrase_wrong"
REGISTRY_PASSPHRASE_NEEDED = "registry_passphrase_needed"
NOT_SET_UP = "not_set_up"
SETUP_LOCAL_ONLY = "setup_local_only"
BAD_REQUEST = "bad_request"
MAX_POLICY_BYTES = 64 * 1024
MAX_AUDIT_RECORDS = 2000
MAX_PHOTO_BYTES = 40 * 1024 * 1024
MAX_PHOTOS = 10
MIN_NEW_PASSPHRASE = admin.MIN_PASSPHRASE


@dataclass
class Reply:
    status: int
    body: dict
    headers: Dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.body.get("ok"))


def error(status: int, message: str, **extra) -> Reply:
    return Reply(status, {"ok": False, "error": message, **extra})


@dataclass
class Site:
    """What the admin actions need from the UI they serve. `engine` returns the UI's engine or
    raises (its message is shown as the engine's problem); `hooks` (optional) returns the
    adapter's own status (enforce armed, hooks in place) for the status reply. `ui_name` and
    `panel` name the UI and its Consent Guard screen in messages ("ComfyUI", "the Consent
    Guard panel")."""
    home: Callable[[], Path]
    engine: Callable[[], object]
    model_dirs: Callable[[], Sequence[Path]] = lambda: ()
    insightface_dirs: Callable[[], Sequence[Path]] = lambda: ()
    source: str = "ui"  # for the audit log and the server log: "a1111 tab", "comfyui panel"
    hooks: Optional[Callable[[], dict]] = None
    ui_name: str = "the webui"
    panel: str = "the Consent Guard tab"


# -- the passphrase limiter: one per process, for every UI and route ---------------------------

WRONG, RIGHT, UNCHECKED = "wrong", "right", "unchecked"  # how a reserved check ended


class PassphraseLimiter:
    """Limits wrong admin passphrases per client (remote address) and for the whole process.

    A client gets `max_failures` wrong passphrases within `window` seconds; then that client
    alone is refused for `lockout` seconds, so one guesser cannot lock anyone else out. All
    clients together get `global_failures` within the window; past that, attempts from anyone
    are spaced `global_spacing` seconds apart until the window clears. A guesser with many
    addresses (or everyone behind one reverse proxy) is slowed to that pace, never locked out
    for longer than one spacing, and the command line on the machine always works. An address
    that gave the right passphrase within `trust_for` seconds skips that spacing (its own limit
    still holds), so a flood of guesses cannot starve the admin of slots.

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
        self._trusted: Dict[str, float] = {}
        self._global: deque = deque()
        self._global_pending = 0
        self._next_slot = 0.0
        self._lock = threading.Lock()

    def _client(self, client: str, now: float) -> "_Client":
        for old in [k for k, c in self._clients.items() if c.idle(now, self.window)]:
            del self._clients[old]
        for old in [k for k, until in self._trusted.items() if until <= now]:
            del self._trusted[old]
        while self._global and self._global[0] <= now - self.window:
            self._global.popleft()
        state = self._clients.setdefault(client, _Client())
        state.prune(now, self.window)
        return state

    def retry_after(self, client: str = "") -> int:
        """Seconds until `client` may try again; 0 when it may try now (nothing reserved)."""
        with self._lock:
            now = self.clock()
            return self._wait(client, self._client(client, now), now)

    def _wait(self, client: str, state: "_Client", now: float) -> int:
        if state.locked_until > now:
            return max(1, math.ceil(state.locked_until - now))
        if len(state.failures) + state.pending >= self.max_failures:
            return 1
        if self._over_global() and self._next_slot > now and client not in self._trusted:
            return max(1, math.ceil(self._next_slot - now))
        return 0

    def _over_global(self) -> bool:
        return len(self._global) + self._global_pending >= self.global_failures

    def begin(self, client: str = "") -> Tuple[Optional[str], int]:
        """Reserve one passphrase check: (ticket, 0), or (None, seconds to wait). Every
        ticket must be given back with end()."""
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


# One limiter per process: every route and tab of one UI counts together (ComfyUI's enrol
# dialog and admin routes; the webui's tab and FastAPI routes).
LIMITER = PassphraseLimiter()
_ENROL_LOCK = threading.Lock()  # one enrolment at a time: two first ones cannot race


def too_many(seconds: int) -> Reply:
    return Reply(429, {"ok": False, "error": f"Too many wrong passphrases: try again in "
                                             f"{seconds} s.", "retry_after": seconds,
                       "code": "too_many"}, {"Retry-After": str(seconds)})


def is_loopback(client: str) -> bool:
    """The peer is this machine (127.0.0.0/8, ::1, an IPv4-mapped loopback). Behind a reverse
    proxy on the same machine every peer looks local: such a set-up must use the CLI."""
    import ipaddress

    try:
        addr = ipaddress.ip_address(str(client).split("%")[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool((mapped or addr).is_loopback)


# -- the admin check -------------------------------------------------------------------------

def admin_ok(site: Site, passphrase: Optional[str], what: str, always: bool = False,
             client: str = "") -> Optional[Reply]:
    """None when the change may go ahead, else the reply refusing it. `always`: the admin
    passphrase is needed even while unlocked. No passphrase: refused, not counted."""
    home = site.home()
    st = admin.state(home)
    if always and not st.has_passphrase:
        return error(403, f"{what[0].upper()}{what[1:]} is for the admin: do the first-run "
                          f"set-up first ({site.panel}, or `consent-guard setup`).",
                     code=NOT_SET_UP)
    if not always and not st.locked:
        return None
    if not passphrase:
        return error(403, (f"Consent Guard is locked by the admin: {what} needs the admin "
                           f"passphrase. Type it in the admin passphrase field." if st.locked
                           else f"{what[0].upper()}{what[1:]} needs the admin passphrase: "
                                f"type it in the admin passphrase field."),
                     code=PASSPHRASE_MISSING, locked=st.locked)
    ticket, retry = LIMITER.begin(client)
    if ticket is None:
        return too_many(retry)
    ok = False
    try:
        ok = admin.verify(home, passphrase) and not st.problem
    finally:
        LIMITER.end(ticket, RIGHT if ok else WRONG)
    if ok:
        return None
    message = (f"Consent Guard is locked and {st.problem}; {what} was refused." if st.problem
               else f"Wrong admin passphrase: {what} was refused. Check it and type it again.")
    log.warning("Consent Guard: %s", message)
    return error(403, message, code=PASSPHRASE_WRONG, locked=st.locked)


# -- status ------------------------------------------------------------------------------------

_models_cache: dict = {}


def _engine_or_problem(site: Site):
    try:
        return site.engine(), None
    except Exception as exc:  # the UI's engine refuses (fail closed): say why, never crash
        return None, str(exc) or type(exc).__name__


def _policy_of(site: Site, engine):
    if engine is not None:
        return engine.policy
    try:
        return load_policy(home=site.home())
    except Exception:
        return None


def models(site: Site, policy) -> List[dict]:
    """[{name, ok, error?}] for the manifest's models as this UI resolves them (hashed once per
    [models.paths] and model folders)."""
    try:
        from .models import ModelResolver, describe

        dirs = tuple(Path(d) for d in site.model_dirs())
        paths = policy.model_paths if policy is not None else {}
        key = (tuple(sorted(paths.items())), dirs)
        if key not in _models_cache:
            resolver = ModelResolver(paths, dirs)
            _models_cache.clear()
            _models_cache[key] = [{k: r[k] for k in ("name", "ok", "error") if k in r}
                                  for r in describe(resolver, sorted(resolver.manifest))]
        return _models_cache[key]
    except Exception as exc:
        return [{"name": "(models)", "ok": False, "error": f"{type(exc).__name__}: {exc}"}]


def running_setup(site: Site, engine=None, policy=None) -> dict:
    """Which home, policy (path, sha256, enforce) and registry (path, how many people; "none"
    when there is none, null when it cannot be opened) this UI checks with: the same shape as
    ComfyUI's, so `consent-guard doctor` can compare. Counts and hashes, never a name."""
    from .registry import REGISTRY_FILENAME, registry_paths

    where = site.home()
    policy_path = Path(policy.source) if policy is not None and policy.source else \
        where / POLICY_FILENAME
    db = registry_paths(policy, where)[0] if policy is not None else where / REGISTRY_FILENAME
    if engine is not None and getattr(engine, "registry", None) is not None:
        count = len(engine.registry.identities())
    else:
        count = None if db.exists() else "none"
    return {"home": str(where),
            "policy": {"path": str(policy_path), "sha256": expect.sha256_of(policy_path),
                       "enforce": None if policy is None else bool(policy.enforce)},
            "registry": {"path": str(db), "exists": db.exists(), "identities": count}}


def status(site: Site) -> Reply:
    """Everything a status view shows, no secrets: set up, lock, enforce, models, how many
    people are protected, the audit log's health, the engine's problem, the adapter's hooks."""
    home = site.home()
    st = admin.state(home)
    engine, problem = _engine_or_problem(site)
    policy = _policy_of(site, engine)
    audit = getattr(engine, "audit", None) if engine is not None else None
    body = {"ok": True, "set_up": st.has_passphrase, "admin_passphrase_set": st.has_passphrase,
            "locked": st.locked, "lock_problem": st.problem,
            "enforce": None if policy is None else bool(policy.enforce),
            "engine_problem": problem,
            "audit": None if audit is None else {"healthy": audit.healthy,
                                                 "problem": audit.last_error},
            "models": models(site, policy),
            "setup": running_setup(site, engine, policy)}
    if site.hooks is not None:
        try:
            body.update(site.hooks())
        except Exception as exc:
            body["hooks_problem"] = f"{type(exc).__name__}: {exc}"
    return Reply(200, body)


# -- policy ------------------------------------------------------------------------------------

def policy_get(site: Site) -> Reply:
    path = site.home() / POLICY_FILENAME
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else None
    except OSError as exc:
        return error(500, f"The policy {path} cannot be read: {exc}")
    return Reply(200, {"ok": True, "path": str(path), "text": text,
                       "locked": admin.is_locked(site.home())})


def policy_post(site: Site, text, passphrase=None, client: str = "") -> Reply:
    """Validate, then write and approve the policy (expect.py). While locked: only with the
    admin passphrase, so nothing loosens protection without it."""
    if not isinstance(text, str) or len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        return error(400, f"Send the policy as text (TOML, at most {MAX_POLICY_BYTES} bytes).",
                     code=BAD_REQUEST)
    refused = admin_ok(site, passphrase if isinstance(passphrase, str) else None,
                       "changing the policy", client=client)
    if refused is not None:
        return refused
    from .policy import policy_from_dict
    try:
        try:
            import tomllib
        except ModuleNotFoundError:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        policy_from_dict(tomllib.loads(text), "<the policy sent>")
    except (PolicyError, ValueError) as exc:
        return error(400, f"The policy was not changed: {exc}", code="policy_invalid")
    home = site.home()
    path = home / POLICY_FILENAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        return error(500, f"The policy {path} cannot be written: {exc}")
    try:
        expect.record_policy(home, path)
    except (OSError, expect.ExpectationError) as exc:
        log.error("Consent Guard: the policy was written but not recorded as approved: %s", exc)
        return error(500, f"The policy was written, but {expect.expect_path(home)} cannot be: "
                          f"{exc}. In enforce mode it is refused until the admin runs "
                          f"`{expect.APPROVE_COMMAND}`.")
    log.warning("Consent Guard: the policy was changed from the %s", site.source)
    return Reply(200, {"ok": True, "path": str(path)})


# -- audit -------------------------------------------------------------------------------------

def audit(site: Site, passphrase=None, since=None, decision=None, limit=200,
          client: str = "") -> Reply:
    """The newest `limit` audit records; always needs the admin passphrase (the log holds ids
    and hashes of who was refused)."""
    refused = admin_ok(site, passphrase if isinstance(passphrase, str) else None,
                       "reading the audit log", always=True, client=client)
    if refused is not None:
        return refused
    from .audit import audit_for, read_records

    try:
        log_file = audit_for(load_policy(home=site.home()), site.home())
    except Exception as exc:
        return error(500, f"The audit log cannot be found: {exc}")
    if log_file is None:
        return Reply(200, {"ok": True, "records": [], "total": 0,
                           "note": "[audit] enabled = false"})
    try:
        limit = max(1, min(int(limit or 200), MAX_AUDIT_RECORDS))
    except (TypeError, ValueError):
        return error(400, "limit must be a number.", code=BAD_REQUEST)
    try:
        records = list(read_records(log_file.path, since=since or None,
                                    decision=decision or None))
    except ValueError as exc:
        return error(400, str(exc), code=BAD_REQUEST)
    return Reply(200, {"ok": True, "records": records[-limit:], "total": len(records),
                       "path": str(log_file.path)})


# -- provenance ----------------------------------------------------------------------------------

def verify_image(site: Site, image, name=None, passphrase=None, client: str = "") -> Reply:
    """`consent-guard verify` for one image file sent as base64 (the admin's verify dialog):
    the invisible mark, the signed verdict, and whether this machine signed it. With the
    admin passphrase, also the audit record it points to (without one nothing is counted as
    a guess: the rest is in the file already)."""
    import base64
    import binascii

    from . import provenance
    from .audit import audit_for

    if not isinstance(image, str) or not image:
        return error(400, "Send the image file as base64 in \"image\".", code=BAD_REQUEST)
    try:
        data = base64.b64decode(image.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        return error(400, "\"image\" is not base64.", code=BAD_REQUEST)
    if len(data) > MAX_PHOTO_BYTES:
        return error(413, f"The file is larger than {MAX_PHOTO_BYTES // 2 ** 20} MB.",
                     code=BAD_REQUEST)
    record = isinstance(passphrase, str) and bool(passphrase)
    if record:
        refused = admin_ok(site, passphrase, "showing the audit record of an image",
                           always=True, client=client)
        if refused is not None:
            return refused
    engine, _ = _engine_or_problem(site)
    policy = _policy_of(site, engine) or load_policy()
    check = provenance.verify_file(io.BytesIO(data), home=site.home(),
                                   marker=provenance.marker_for(policy, site.model_dirs()),
                                   name=str(name or "image"), max_pixels=policy.max_pixels)
    if check.error:
        return error(400, check.error, code=BAD_REQUEST)
    if record:
        log_file = audit_for(policy, site.home())
        check.record = ({"found": False, "why": "[audit] enabled = false"} if log_file is None
                        else provenance.record_for(check, log_file.path))
    return Reply(200, {"ok": True, **check.to_dict()})


# -- set-up and lock ---------------------------------------------------------------------------

def setup_describe(site: Site) -> Reply:
    return Reply(200, {"ok": True, **setup.describe(site.home())})


def setup_post(site: Site, passphrase, passphrase_confirm, enforce, locked,
               registry_passphrase=None, client: str = "") -> Reply:
    """The first-run set-up (setup.run_setup), only from this machine: until it is done nobody
    holds the admin passphrase, so the first to send one becomes the admin, and a webui
    started with --listen could hand that to anyone on the network."""
    if not is_loopback(client):
        log.warning("Consent Guard: set-up refused from %s (not this machine)", client)
        return error(403, f"Set Consent Guard up on the computer {site.ui_name} runs on: open "
                          f"{site.ui_name} there (http://127.0.0.1:<port>), or run "
                          f"`consent-guard setup` there.",
                     code=SETUP_LOCAL_ONLY)
    if not isinstance(enforce, bool) or not isinstance(locked, bool):
        return error(400, "Send enforce and locked as true or false.", code=BAD_REQUEST)
    texts = (passphrase, passphrase_confirm, registry_passphrase)
    if any(v is not None and not isinstance(v, str) for v in texts):
        return error(400, "Passphrases must be text.", code=BAD_REQUEST)
    ticket, retry = LIMITER.begin(client)
    if ticket is None:
        return too_many(retry)
    outcome = UNCHECKED
    try:
        result = setup.run_setup(site.home(), passphrase, passphrase_confirm,
                                 registry_passphrase=registry_passphrase or None,
                                 source=site.source, enforce=enforce, locked=locked)
    except setup.SetupError as exc:
        if exc.code == setup.REGISTRY_PASSPHRASE_WRONG:
            outcome = WRONG
        return error(exc.status, str(exc), code=exc.code, done=exc.done)
    finally:
        LIMITER.end(ticket, outcome)
    return Reply(200, {"ok": True, **result.to_dict()})


def lock_post(site: Site, locked, passphrase=None, client: str = "") -> Reply:
    """Lock or unlock; both always need the admin passphrase."""
    if not isinstance(locked, bool):
        return error(400, "Send locked as true or false.", code=BAD_REQUEST)
    what = "locking Consent Guard" if locked else "unlocking Consent Guard"
    refused = admin_ok(site, passphrase if isinstance(passphrase, str) else None, what,
                       always=True, client=client)
    if refused is not None:
        return refused
    try:
        admin.set_locked(site.home(), locked, passphrase)
    except admin.AdminError as exc:
        return error(500, str(exc))
    log.warning("Consent Guard: %s from the %s", "locked" if locked else "unlocked",
                site.source)
    return Reply(200, {"ok": True, "locked": locked})


# -- enrolment ---------------------------------------------------------------------------------

@dataclass
class Photo:
    source: str  # the file name (no folders), or "photo N"
    data: Optional[bytes]  # None when refused before decoding
    reason: str = ""


@dataclass
class EnrolForm:
    passphrase: str
    name: str
    scope: str
    consent_by: str
    photos: List[Photo]
    aliases: str = ""
    on_behalf_of: str = ""
    consent_date: str = ""
    note: str = ""
    registry_passphrase: str = ""
    passphrase_confirm: Optional[str] = None  # for a first enrolment with no set-up yet


class FormError(ValueError):
    def __init__(self, message: str, code: str = "bad_form"):
        super().__init__(message)
        self.code = code


def _checked(form: EnrolForm):
    """(aliases list, Consent) from the form; FormError naming what is missing or wrong."""
    from .registry import SCOPES, Consent

    form.scope = (form.scope or "").strip()
    missing = [label for value, label in ((form.name, "name"), (form.scope, "scope"),
                                          (form.consent_by, "consent given by"))
               if not (value or "").strip()]
    if not form.passphrase:
        missing.append("admin passphrase")
    if not form.photos:
        missing.append("photo")
    if missing:
        raise FormError("Missing: " + ", ".join(missing) + ".",
                        PASSPHRASE_MISSING if "admin passphrase" in missing else "missing")
    if form.scope not in SCOPES:
        raise FormError(f"scope must be one of {', '.join(SCOPES)}.")
    date = (form.consent_date or "").strip() or time.strftime("%Y-%m-%d")
    try:
        datetime.date.fromisoformat(date)
    except ValueError:
        raise FormError("The consent date must be a date as YYYY-MM-DD.") from None
    if len(form.name.strip()) > 200:
        raise FormError("The name is too long (at most 200 characters).")
    aliases = [a.strip() for a in (form.aliases or "").split(",") if a.strip()]
    return aliases, Consent(form.consent_by.strip(), (form.on_behalf_of or "").strip(), date,
                            (form.note or "").strip())


class PhotoRefused(ValueError):
    """An upload that is not a usable image; the message says why."""


def decode_photo(data: bytes, max_pixels: int):
    """RGB uint8 pixels of a photo, turned upright by its EXIF orientation; PhotoRefused with
    a reason a person can act on."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

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
    except Exception as exc:
        raise PhotoRefused(f"corrupt or truncated image ({type(exc).__name__})") from None


def _row(source: str, ok: bool, reason: str) -> dict:
    return {"source": source, "ok": ok, "reason": reason}


def enrol(site: Site, form: EnrolForm, client: str = "") -> Reply:
    """Enrol one person from the form (identities.enrol_person). The passphrase checks (the
    admin's while locked, the registry's) are one reserved attempt of `client`'s."""
    try:
        aliases, consent = _checked(form)
    except FormError as exc:
        return error(400, str(exc), code=exc.code)
    ticket, retry = LIMITER.begin(client)
    if ticket is None:
        return too_many(retry)
    outcome = {"passphrase": UNCHECKED}
    try:
        with _ENROL_LOCK:
            return _enrol_checked(site, form, aliases, consent, outcome)
    except Exception as exc:  # never the passphrase: it is not in any message
        log.exception("Consent Guard: enrolment failed")
        return error(500, f"Enrolment failed: {type(exc).__name__}: {exc}")
    finally:
        LIMITER.end(ticket, outcome["passphrase"])
        for p in form.photos:
            p.data = None  # let the photos' bytes go


def _wrong_admin(site: Site) -> Reply:
    return error(403, "Wrong admin passphrase: nothing was enrolled. Check it and type it "
                      "again.", code=PASSPHRASE_WRONG, locked=admin.is_locked(site.home()))


def _enrol_checked(site: Site, form: EnrolForm, aliases, consent, outcome: dict) -> Reply:
    from .registry import registry_paths

    home = site.home()
    try:
        admin.require_admin(home, form.passphrase, "enrolling someone")
    except admin.AdminLocked as exc:
        outcome["passphrase"] = WRONG
        log.warning("Consent Guard: %s", exc)
        return _wrong_admin(site)
    engine, problem = _engine_or_problem(site)
    policy = _policy_of(site, engine)
    if policy is None:
        return error(500, f"The policy cannot be read: {problem}")
    db, _ = registry_paths(policy, home)
    admin_set = admin.state(home).has_passphrase
    if not db.exists() and admin_set:  # after set-up a new registry gets the admin passphrase
        if not admin.verify(home, form.passphrase):
            outcome["passphrase"] = WRONG
            return _wrong_admin(site)
    elif not db.exists():  # no set-up yet: this passphrase will seal the new registry
        if form.passphrase_confirm is None or form.passphrase_confirm != form.passphrase:
            return error(400, "No identity registry exists yet, so this enrolment creates one "
                              "with this passphrase: do the first-run set-up first (it sets "
                              "one admin passphrase for both), or type it twice.",
                         code=NOT_SET_UP)
        if len(form.passphrase) < MIN_NEW_PASSPHRASE:
            return error(400, f"Use an admin passphrase of at least {MIN_NEW_PASSPHRASE} "
                              f"characters.", code=setup.PASSPHRASE_TOO_SHORT)
    rows: List[Optional[dict]] = []
    pixels, sources = [], []
    for p in form.photos[:MAX_PHOTOS]:
        if p.data is None:
            rows.append(_row(p.source, False, p.reason or "not read"))
            continue
        try:
            pixels.append(decode_photo(p.data, policy.max_pixels))
        except PhotoRefused as exc:
            rows.append(_row(p.source, False, str(exc)))
            continue
        finally:
            p.data = None
        sources.append(p.source)
        rows.append(None)
    for p in form.photos[MAX_PHOTOS:]:
        rows.append(_row(p.source, False, f"not read: at most {MAX_PHOTOS} photos at a time"))

    def merged(checks) -> List[dict]:
        out, decoded = [], iter(zip(sources, checks))
        for r in rows:
            if r is None:
                source, check = next(decoded)
                r = _row(source, check.ok, check.reason)
            out.append(r)
        return out

    if not pixels:
        return error(400, "No photo could be read; nothing was enrolled.", photos=rows)
    try:
        result = enrol_person(
            policy, home, form.registry_passphrase or form.passphrase, name=form.name.strip(),
            scope=form.scope, consent=consent, photos=pixels, aliases=aliases,
            model_dirs=[Path(d) for d in site.model_dirs()],
            insightface_dirs=[Path(d) for d in site.insightface_dirs()])
    except LockedError:
        outcome["passphrase"] = WRONG
        log.warning("Consent Guard: enrolment refused, wrong passphrase")
        if form.registry_passphrase:
            return error(403, "Wrong registry passphrase: it does not open the identity "
                              "registry; nothing was enrolled.", code=PASSPHRASE_WRONG)
        if admin_set and admin.verify(home, form.passphrase):
            outcome["passphrase"] = RIGHT
            return error(403, "The admin passphrase is right, but the identity registry is "
                              "sealed with another passphrase: type that one under \"Registry "
                              "passphrase\"; nothing was enrolled.",
                         code=REGISTRY_PASSPHRASE_NEEDED)
        # No lock in play here (the admin check above passed): the passphrase did not open
        # the registry, so the reply says only that, as ComfyUI's always did.
        return error(403, "Wrong admin passphrase: nothing was enrolled. Check it and type "
                          "it again.", code=PASSPHRASE_WRONG)
    except EnrolmentRefused as exc:
        return error(400, "No photo was usable; nothing was enrolled. Use clear photos of this "
                          "person alone, face to the camera.", photos=merged(exc.checks))
    except ModelError as exc:
        return error(500, f"The face models cannot run: {exc}")
    except RegistryError as exc:  # e.g. the name is already enrolled
        return error(400, str(exc))
    outcome["passphrase"] = RIGHT
    _record_registry(home, policy)
    ident = result.identity
    log.info("Consent Guard: enrolled %s (scope %s) from the %s", ident.id, ident.scope,
             site.source)
    return Reply(200, {"ok": True, "id": ident.id, "name": ident.name, "scope": ident.scope,
                       "photos": merged(result.checks), "backends": result.backends,
                       "notes": result.notes})


def _record_registry(home: Path, policy) -> None:
    """The admin's record now expects this registry (expect.py): its absence later refuses."""
    from .registry import registry_paths

    db, key_file = registry_paths(policy, home)
    try:
        if "registry" not in expect.read(home):
            expect.record_registry(home, db, key_file)
    except (OSError, expect.ExpectationError) as exc:
        log.error("Consent Guard: the new registry was not recorded in %s: %s",
                  expect.expect_path(home), exc)
