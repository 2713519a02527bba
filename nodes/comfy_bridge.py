"""What the ComfyUI adapter needs from ComfyUI, in one place: folders, tensors, progress.

Signatures followed (ComfyUI a125cd84, folder_paths.py): get_output_directory(),
get_temp_directory(), get_user_directory(), models_dir, add_model_folder_path(name, path),
get_folder_paths(name), get_save_image_path(prefix, output_dir, width, height) ->
(full_output_folder, filename, counter, subfolder, filename_prefix). comfy/utils.py:
ProgressBar(total).update(n). IMAGE tensors are float32 [B, H, W, C] in 0..1.

The home, the engine, the registry and the audit log are shared with the A1111/Forge adapter
through consent_guard/host.py (HOST below); this module keeps its names for the nodes.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

import folder_paths  # ComfyUI's module; present whenever ComfyUI loads this package

from ..consent_guard import Engine
from ..consent_guard import messages
from ..consent_guard.host import Host
from ..consent_guard.imageio import uint8_to_float01

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


def insightface_dirs() -> List[Path]:
    """Where ComfyUI users keep InsightFace packs (IPAdapter FaceID, InstantID, ReActor):
    <models>/insightface, plus any folder registered under that name in extra_model_paths."""
    dirs = [Path(folder_paths.models_dir) / "insightface"]
    try:
        dirs += [Path(p) for p in folder_paths.get_folder_paths("insightface")]
    except Exception:  # the name is registered only by some custom nodes
        pass
    return list(dict.fromkeys(dirs))


# The shared state (home, engine, registry, audit) lives in consent_guard/host.py, shared
# with the A1111/Forge adapter; ComfyUI gives it its user folder and model folders.
HOST = Host(user_dir=folder_paths.get_user_directory,
            model_dirs=lambda: folder_paths.get_folder_paths(MODEL_FOLDER),
            insightface_dirs=insightface_dirs, error=ConsentGuardError, ui_name="ComfyUI")


def home() -> Path:
    return HOST.home()


def policy_state() -> Tuple:
    """Identifies the policy file's current version (host.Host.policy_state): a policy the
    admin approved that is gone reads as (path, "missing", None)."""
    return HOST.policy_state()


def checks_state() -> Tuple:
    """What a check's result depends on besides its inputs: the policy file and the identity
    registry (someone enrolled or revoked since). Used by the nodes' IS_CHANGED."""
    return HOST.checks_state()


def get_engine() -> Engine:
    """The process's engine; rebuilt when the policy file changes, so edits need no restart.
    A policy that cannot be read raises ConsentGuardError: nothing runs unchecked."""
    return HOST.get_engine()


def engine_for(base: Engine, override: str) -> Engine:
    """`base`, or an engine for a node's policy override (only stricter values when the admin
    lock is on; what was ignored is logged)."""
    return HOST.engine_for(base, override)


def contact() -> str:
    """The admin's line shown under every refusal (policy `[messages] contact`), or ""."""
    return HOST.contact()


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


def tensor_to_frames(images) -> List[np.ndarray]:
    """ComfyUI IMAGE [B, H, W, C] float tensor -> list of H x W x C float arrays."""
    if images is None or not hasattr(images, "shape") or len(images.shape) != 4:
        raise ConsentGuardError(f"expected an IMAGE batch [B, H, W, C], got "
                                f"{getattr(images, 'shape', type(images).__name__)}")
    arr = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images)
    return list(arr)


def frames_to_tensor(frames: List[np.ndarray]):
    """uint8 frames (same shape) -> ComfyUI IMAGE [B, H, W, C] float32 in 0..1, written into
    one array (imageio.uint8_to_float01: no batch-sized temporaries)."""
    import torch

    return torch.from_numpy(uint8_to_float01(frames))


def progress(total: int):
    """ComfyUI's progress bar for long batches, or None outside ComfyUI."""
    try:
        from comfy.utils import ProgressBar
    except ImportError:
        return None
    return ProgressBar(total)
