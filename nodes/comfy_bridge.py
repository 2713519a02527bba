"""What the ComfyUI adapter needs from ComfyUI, in one place: folders, tensors, progress.

Signatures followed (ComfyUI a125cd84, folder_paths.py): get_output_directory(),
get_temp_directory(), get_user_directory(), models_dir, add_model_folder_path(name, path),
get_folder_paths(name), get_save_image_path(prefix, output_dir, width, height) ->
(full_output_folder, filename, counter, subfolder, filename_prefix). comfy/utils.py:
ProgressBar(total).update(n). IMAGE tensors are float32 [B, H, W, C] in 0..1.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

import folder_paths  # ComfyUI's module; present whenever ComfyUI loads this package

from ..consent_guard import Engine, expect, load_policy
from ..consent_guard import messages
from ..consent_guard.home import resolve_home
from ..consent_guard.policy import POLICY_FILENAME
from ..consent_guard.registry import REGISTRY_FILENAME, open_for_matching, registry_paths

log = logging.getLogger("consent_guard")
MODEL_FOLDER = "consent_guard"  # <ComfyUI>/models/consent_guard/ may hold the weight files

folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


class ConsentGuardError(RuntimeError):
    """Raised inside a node so that ComfyUI stops the workflow and shows the message: a check
    that could not run (fail closed). ComfyUI reports it as an `execution_error` (the error
    dialog, with this message)."""


def _interrupt_base() -> type:
    """comfy.model_management.InterruptProcessingException, or Exception outside ComfyUI."""
    try:
        from comfy.model_management import InterruptProcessingException
    except Exception:  # the tests' stand-ins, or no ComfyUI at all
        return Exception
    return InterruptProcessingException


class ConsentGuardRefusal(ConsentGuardError, _interrupt_base()):
    """A refusal by the policy, not a failure: a refused input picture, text or output.

    ComfyUI 0.3.64 (execution.py execute()) takes an InterruptProcessingException as the run
    being stopped: it logs one line ("Processing interrupted"), no traceback, and sends
    `execution_interrupted` instead of `execution_error`, so the front end shows no crash
    report. nodes/enforce.py's hook on PromptExecutor.handle_execution_error then sends the
    plain message (consent_guard/messages.py) as the REFUSAL_EVENT websocket event and keeps
    it in the prompt's history, where API clients find it. Still a ConsentGuardError, so
    every `except ConsentGuardError` treats it as before."""

    def __init__(self, kind: str, where: str = "", lead: str = ""):
        """`kind`: consent_guard/messages.py KINDS; `where`: the node, for the log and the
        admin; `lead`: the first words of the log line (default: "Consent Guard refused
        this run")."""
        self.kind = kind if kind in messages.KINDS else messages.CHECK_FAILED
        self.where = where
        said = messages.message(self.kind, contact=contact())
        super().__init__(f"{lead or 'Consent Guard refused this run'}: {said.text()}")

    def payload(self, locale: Optional[str] = None, **extra) -> dict:
        return messages.payload(self.kind, contact(), locale, where=self.where or None,
                                **extra)


REFUSAL_EVENT = "consent_guard.refusal"  # web/js/refusals.js listens for it


_engine: Optional[Engine] = None
_engine_key: Optional[Tuple] = None
_lock = threading.Lock()


def home() -> Path:
    return resolve_home(folder_paths.get_user_directory())


def _file_state(path: Path) -> Tuple:
    try:
        stat = path.stat()
        return (str(path), stat.st_mtime_ns, stat.st_size)
    except FileNotFoundError:
        return (str(path), None, None)


def policy_state() -> Tuple:
    """Identifies the policy file's current version (path, mtime, size). A policy the admin
    approved that is gone reads as (path, "missing", None), not as "no file": enforce.py takes
    a policy file that exists but cannot be used for enforce mode on, and so must it take one
    that the admin's record says exists (expect.py); get_engine then refuses to check."""
    state = _file_state(home() / POLICY_FILENAME)
    if state[1] is None and _policy_expected():
        return (state[0], "missing", None)
    return state


def _policy_expected() -> bool:
    try:
        rec = expect.read(home()).get("policy") or {}
    except expect.ExpectationError:
        return True  # a record that cannot be read: assume the worst
    return bool(rec.get("sha256"))


def checks_state() -> Tuple:
    """What a check's result depends on besides its inputs: the policy file and the identity
    registry (someone enrolled or revoked since). Used by the nodes' IS_CHANGED."""
    engine_policy = _engine.policy if _engine is not None else None
    db = registry_paths(engine_policy, home())[0] if engine_policy is not None else \
        home() / REGISTRY_FILENAME
    return policy_state() + _file_state(db) + _file_state(Path(str(db) + "-wal"))


def insightface_dirs() -> List[Path]:
    """Where ComfyUI users keep InsightFace packs (IPAdapter FaceID, InstantID, ReActor):
    <models>/insightface, plus any folder registered under that name in extra_model_paths."""
    dirs = [Path(folder_paths.models_dir) / "insightface"]
    try:
        dirs += [Path(p) for p in folder_paths.get_folder_paths("insightface")]
    except Exception:  # the name is registered only by some custom nodes
        pass
    return list(dict.fromkeys(dirs))


def get_engine() -> Engine:
    """The process's engine; rebuilt when the policy file changes, so edits need no restart.
    A policy that cannot be read raises ConsentGuardError: nothing runs unchecked."""
    global _engine, _engine_key
    key = policy_state() + (_registry_exists(),) + _file_state(expect.expect_path(home()))
    policy_path = Path(key[0])
    with _lock:
        if _engine is None or key != _engine_key:
            try:
                policy = load_policy(home=policy_path.parent)
            except Exception as exc:
                raise ConsentGuardError(f"Consent Guard cannot read its policy, so nothing is "
                                        f"saved: {exc}") from exc
            registry = _open_expected_registry(policy, policy_path.parent)
            if _engine is not None and _engine.registry is not None:
                _engine.registry.close()
            model_dirs = [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER)]
            _engine = Engine(policy, model_dirs=model_dirs, registry=registry,
                             insightface_dirs=insightface_dirs())
            try:
                from ..consent_guard.audit import audit_for

                _engine.audit = audit_for(policy, policy_path.parent)
            except Exception as exc:  # the log is not needed to check, but enforce needs it
                log.error("Consent Guard: the audit log cannot be opened: %s", exc)
                if policy.enforce:
                    raise ConsentGuardError(f"Consent Guard cannot open its audit log, and in "
                                            f"enforce mode nothing runs unlogged: {exc}") from exc
            _overrides.clear()
            # building may have written the admin's record (a registry seen for the first
            # time): that write is not a change to rebuild for
            _engine_key = key[:-3] + _file_state(expect.expect_path(home()))
        return _engine


_seen_registries: set = set()  # registries this process has opened: they cannot vanish


def _open_expected_registry(policy, where: Path):
    """The registry, after the admin's record (expect.py) and this process's own memory agree
    that nothing expected is missing: a registry that existed must never read as "nobody is
    protected", nor a swapped policy as approved."""
    db, key_file = registry_paths(policy, where)
    gone = [str(p) for p in sorted(_seen_registries) if not Path(p).exists()]
    if gone:
        raise ConsentGuardError(f"Consent Guard refuses to check, so nothing is saved: the "
                                f"identity registry {', '.join(gone)} was open in this ComfyUI "
                                f"and is gone; restore it (if it was removed on purpose: "
                                f"`{expect.FORGET_COMMAND}`, then restart ComfyUI)")
    try:
        for note in expect.require(where, policy, db, key_file):
            log.warning("Consent Guard: %s", note)
    except expect.ExpectationError as exc:
        raise ConsentGuardError(f"{exc}. Nothing is saved until this is resolved.") from exc
    try:  # an existing registry that cannot be opened must not mean "nobody protected"
        registry = open_for_matching(policy, where)
    except Exception as exc:
        raise ConsentGuardError(f"Consent Guard cannot open the identity registry, so "
                                f"nothing is saved: {exc}") from exc
    if registry is not None:
        _seen_registries.add(str(db))
        if not expect.note_registry(where, db, key_file):
            log.warning("Consent Guard: could not record the registry in %s; the admin's "
                        "commands record it", expect.expect_path(where))
    return registry


_overrides: dict = {}  # (override text, locked) -> engine, for the current base engine


def engine_for(base: Engine, override: str) -> Engine:
    """`base`, or an engine for a node's policy override (only stricter values when the admin
    lock is on; what was ignored is logged)."""
    if not (override or "").strip():
        return base
    from ..consent_guard.admin import is_locked
    from ..consent_guard.overrides import apply_override

    locked = is_locked(home())
    key = (override, locked, id(base))
    with _lock:
        hit = _overrides.get(key)
    if hit is not None:
        return hit
    try:
        policy, ignored = apply_override(base.policy, override, locked)
    except Exception as exc:
        raise ConsentGuardError(str(exc)) from exc
    for note in ignored:
        log.warning("Consent Guard: the admin lock is on, so a node's looser setting is "
                    "ignored: %s", note)
    base.load()
    engine = base.with_policy(policy)
    with _lock:
        _overrides[key] = engine
    return engine


def contact() -> str:
    """The admin's line shown under every refusal (policy `[messages] contact`), or ""."""
    engine = _engine
    if engine is None:
        try:
            engine = get_engine()
        except Exception:
            return ""
    return getattr(engine.policy, "contact", "") or ""


SETTINGS_FILE = "comfy.settings.json"  # ComfyUI app/app_settings.py, per user
LOCALE_SETTING = "Comfy.Locale"  # the front end's language setting


def ui_locale() -> Optional[str]:
    """The language the ComfyUI front end is set to, when the user has chosen one (it is
    saved in <user dir>/default/comfy.settings.json); None when unknown. For what the server
    draws itself (placeholders): the browser picks its own language for messages."""
    try:
        import json

        path = Path(folder_paths.get_user_directory()) / "default" / SETTINGS_FILE
        value = json.loads(path.read_text(encoding="utf-8")).get(LOCALE_SETTING)
    except Exception:
        return None
    return value if isinstance(value, str) and value.strip() else None


def send_event(event: str, data: dict) -> bool:
    """Send a websocket event to the client whose prompt runs (PromptServer.send_sync);
    False when there is no server or no client (an API client without a websocket)."""
    try:
        import server as comfy_server

        instance = comfy_server.PromptServer.instance
        sid = getattr(instance, "client_id", None)
        if instance is None or sid is None:
            return False
        instance.send_sync(event, data, sid)
        return True
    except Exception as exc:
        log.warning("Consent Guard: could not send %s to the browser: %s", event, exc)
        return False


def client_id() -> Optional[str]:
    """The ComfyUI client whose prompt is running (execution.py sets server.client_id from
    the prompt's extra_data), for the audit log."""
    try:
        import server as comfy_server
        return getattr(comfy_server.PromptServer.instance, "client_id", None)
    except Exception:
        return None


def _registry_exists() -> bool:
    """A registry created after the engine was built must be picked up (the engine keeps an
    open registry and sees later changes to it through its generation counter)."""
    policy = _engine.policy if _engine is not None else None
    db = registry_paths(policy, home())[0] if policy is not None else home() / REGISTRY_FILENAME
    return db.exists()


def tensor_to_frames(images) -> List[np.ndarray]:
    """ComfyUI IMAGE [B, H, W, C] float tensor -> list of H x W x C float arrays."""
    if images is None or not hasattr(images, "shape") or len(images.shape) != 4:
        raise ConsentGuardError(f"expected an IMAGE batch [B, H, W, C], got "
                                f"{getattr(images, 'shape', type(images).__name__)}")
    arr = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images)
    return list(arr)


def frames_to_tensor(frames: List[np.ndarray]):
    import torch

    return torch.from_numpy(np.stack(frames).astype(np.float32) / 255.0)


def progress(total: int):
    """ComfyUI's progress bar for long batches, or None outside ComfyUI."""
    try:
        from comfy.utils import ProgressBar
    except ImportError:
        return None
    return ProgressBar(total)
