"""Consent Guard's early guard for enforce mode, run by ComfyUI before any custom node.

ComfyUI a125cd84 (0.3.64) main.py `execute_prestartup_script()` runs each custom node
folder's `prestartup_script.py` right after parsing its arguments and before it imports
`execution`, `server` or any custom node (it skips folders named `*.disabled` and all of them
under `--disable-all-custom-nodes`; `consent-guard doctor` reports both).

What it does: when the policy says `enforce = true` (or the policy file exists but cannot be
read, or the admin approved a policy that is now missing or changed: fail closed, see
consent_guard/expect.py), every submission is refused until the plugin itself has loaded and
armed all its hooks (nodes/enforce.py; from then on the plugin's get_engine refuses to check
with a missing or unapproved policy). So an import error in the plugin, a missing dependency or
a broken model folder cannot leave ComfyUI running unprotected: POST /prompt answers 400 with a
message that says why. It does so by wrapping `execution.validate_prompt` the moment ComfyUI
imports `execution` (an import hook), without importing anything heavy itself: importing torch
here would come before ComfyUI sets up CUDA from its arguments. Uploads and /view are refused
the same way until then (a middleware put on `server.PromptServer`'s app when ComfyUI imports
`server`): the plugin's own guard of those routes (nodes/http_guard.py) may be what is missing.

This file must not import the plugin: it has to work when the plugin is what is broken.
"""
import functools
import importlib.abc
import json
import logging
import os
import sys
import types

STATE_MODULE = "_consent_guard_enforce"  # nodes/enforce.py reads and updates the same module
POLICY_FILENAME = "policy.toml"
EXPECT_FILENAME = "expected.json"  # consent_guard/expect.py
APPROVE_COMMAND = "consent-guard admin approve-policy"
log = logging.getLogger("consent_guard")


def _home() -> str:
    env = os.environ.get("CONSENT_GUARD_HOME")
    if env:
        return os.path.expanduser(env)
    import folder_paths  # ComfyUI's; imported by main.py before this runs

    return os.path.join(folder_paths.get_user_directory(), "consent_guard")


def _enforce_at_boot(home: str):
    """(enforce, problem): whether the policy asks for enforce mode, read without the plugin."""
    path = os.path.join(home, POLICY_FILENAME)
    if not os.path.exists(path):
        return False, None
    try:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        with open(path, "rb") as f:
            value = tomllib.load(f).get("enforce", False)
    except Exception as exc:
        return True, f"the policy {path} cannot be read ({type(exc).__name__}: {exc})"
    if not isinstance(value, bool):
        return True, f"the policy {path} has enforce = {value!r}, which is not true or false"
    return value, None


def _sha256(path: str):
    import hashlib

    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def _expected_policy(home: str, enforce: bool, problem):
    """(enforce, problem) after the admin's record (consent_guard/expect.py, expected.json):
    a policy the admin approved that is now missing, or changed while the approved one
    enforced, keeps enforce mode on and refuses until the admin approves again. A record that
    cannot be read keeps enforce on too. Mirrors expect.policy_problems without importing it."""
    record_path = os.path.join(home, EXPECT_FILENAME)
    try:
        with open(record_path, "r", encoding="utf-8") as f:
            record = json.load(f)
        rec = record.get("policy") if isinstance(record, dict) else None
    except FileNotFoundError:
        return enforce, problem
    except Exception as exc:
        return True, (f"the admin's record {record_path} cannot be read "
                      f"({type(exc).__name__}: {exc})")
    if not isinstance(rec, dict) or not rec.get("sha256"):
        return enforce, problem
    path = os.path.join(home, POLICY_FILENAME)
    now = _sha256(path)
    if now == rec["sha256"]:
        return enforce, problem
    if now is None:
        return True, (f"the policy {path} is missing, but the admin approved one "
                      f"({record_path}); restore it, or the admin runs `{APPROVE_COMMAND}`")
    if rec.get("enforce") or enforce:
        return True, (f"the policy {path} has changed since the admin approved it; the admin "
                      f"checks it and runs `{APPROVE_COMMAND}`")
    return enforce, problem


def _state(enforce: bool, problem):
    st = sys.modules.get(STATE_MODULE)
    if st is None:
        st = types.ModuleType(STATE_MODULE)
        st.armed = False
        sys.modules[STATE_MODULE] = st
    st.guarded = True
    st.enforce_at_boot = enforce
    st.problem = problem or ("the Consent Guard plugin did not finish loading; its error is "
                             "in ComfyUI's log (\"Cannot import ...\")")

    def refusal():  # replaced by nodes/enforce.py once the plugin has loaded
        if st.armed or not st.enforce_at_boot:
            return None
        message = ("Consent Guard enforce mode is on, but its protection is not in place, so "
                   "nothing is queued: " + st.problem)
        return (False, {"type": "consent_guard_not_active", "message": message,
                        "details": message, "extra_info": {}}, [], {})

    st.refusal = refusal
    return st


def _guard(execution) -> None:
    current = execution.validate_prompt
    if getattr(current, "consent_guard_hook", False):
        return

    @functools.wraps(current)
    async def validate_prompt(*args, **kwargs):
        refusal = sys.modules[STATE_MODULE].refusal()
        if refusal is not None:
            log.error("Consent Guard: %s", refusal[1]["message"])
            return refusal
        return await current(*args, **kwargs)

    validate_prompt.consent_guard_hook = True
    execution.validate_prompt = validate_prompt


UPLOAD_ROUTES = ("/upload/", "/view")  # server.py upload_image, upload_mask, view_image


async def _uploads_refused(request, handler):
    """An aiohttp middleware: while enforce mode is on and the plugin has not armed (so its own
    guard of uploads and /view, nodes/http_guard.py, may not be there), uploads and /view are
    refused: a photo uploaded now would be served back unchecked."""
    st = sys.modules.get(STATE_MODULE)
    path = request.path[4:] if request.path.startswith("/api/") else request.path
    if st is None or st.armed or not st.enforce_at_boot or not path.startswith(UPLOAD_ROUTES):
        return await handler(request)
    from aiohttp import web

    message = ("Consent Guard enforce mode is on, but its protection is not in place, so "
               "uploads and /view are refused: " + st.problem)
    return web.json_response({"error": message}, status=403)


_uploads_refused.__middleware_version__ = 1  # what aiohttp's @web.middleware marks: new style


def _guard_server(server) -> None:
    """Wrap server.PromptServer.__init__ (which builds `self.app`) so that the app gets the
    middleware above before it starts."""
    cls = server.PromptServer
    if getattr(cls.__init__, "consent_guard_hook", False):
        return
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        try:
            self.app.middlewares.append(_uploads_refused)
        except Exception:  # the plugin's own guard (and doctor) still report what is missing
            log.exception("Consent Guard: the prestartup upload guard was not installed")

    __init__.consent_guard_hook = True
    cls.__init__ = __init__


GUARDS = {"execution": _guard, "server": _guard_server}


class _GuardExecution(importlib.abc.MetaPathFinder):
    """Finds `execution` and `server` like the other finders would, and guards each once it
    has run."""

    def find_spec(self, name, path=None, target=None):
        if name not in GUARDS or name in self.done:
            return None
        self.done.add(name)
        if self.done >= set(GUARDS):
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        run = spec.loader.exec_module
        guard = GUARDS[name]

        def exec_module(module):
            run(module)
            guard(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    home = _home()
    enforce, problem = _expected_policy(home, *_enforce_at_boot(home))
    _state(enforce, problem)
    finder = _GuardExecution()
    finder.done = set()
    for name, guard in GUARDS.items():
        if name in sys.modules:
            guard(sys.modules[name])
            finder.done.add(name)
    if finder.done != set(GUARDS) and \
            not any(isinstance(f, _GuardExecution) for f in sys.meta_path):
        sys.meta_path.insert(0, finder)
    if enforce:
        log.info("Consent Guard: enforce mode; submissions are refused until the plugin has "
                 "loaded and armed its hooks")


try:
    install()
except Exception:  # never stop ComfyUI from starting; the plugin's own checks still run
    log.exception("Consent Guard: prestartup guard not installed")
