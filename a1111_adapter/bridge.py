"""What the A1111/Forge adapter needs from the WebUI, in one place: its folders, options, the
job state, the user's language, the gradio toast, and the shared Host (consent_guard/host.py:
the home, the engine, the registry, the audit log, the enforce state).

Signatures followed (Forge dfdcbab6; A1111 1.10 has the same names):
modules/paths_internal.py `data_path` (l.30, `--data-dir`, the WebUI folder by default) and
`models_path` (l.32, `--models-dir` or <data>/models); modules/shared.py `opts`, `cmd_opts`,
`state` (modules/shared_state.py State.interrupt() l.87); modules/shared_options.py
`live_previews_enable` (l.383) and `localization` (l.339, "None" or a file name such as
"ko_KR"); `opts.postprocessing_disable_in_extras` (a list of Extras script names).

Where the home is: `<data dir>/consent_guard` (beside config.json and ui-config.json, where a
user who knows the WebUI looks; it moves with `--data-dir`), unless CONSENT_GUARD_HOME is set.
Model files: `<models>/consent_guard` and `<models>/insightface`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional

from consent_guard import messages
from consent_guard.host import Host

log = logging.getLogger("consent_guard")
MODEL_FOLDER = "consent_guard"  # <models>/consent_guard may hold the weight files
SOURCE = "a1111"  # the audit log's `source` for what this adapter records


class ConsentGuardError(RuntimeError):
    """A check that could not run (fail closed): the job is stopped with this message."""


class ConsentGuardRefusal(ConsentGuardError):
    """A refusal by the policy: a refused text, source picture or output. `kind` is one of
    consent_guard/messages.py KINDS; the words shown come from there."""

    def __init__(self, kind: str, where: str = "", detail: str = ""):
        self.kind = kind if kind in messages.KINDS else messages.CHECK_FAILED
        self.where = where
        self.detail = detail  # for the log and the admin (never shown to the user)
        super().__init__(f"Consent Guard refused this job: {self.text()}")

    def text(self, locale: Optional[str] = None) -> str:
        return messages.message(self.kind, locale or ui_locale(), contact=contact()).text()

    def payload(self, locale: Optional[str] = None) -> dict:
        return messages.payload(self.kind, contact(), locale or ui_locale(),
                                where=self.where or None)


def data_dir() -> str:
    """The WebUI's data folder (`--data-dir`; the WebUI folder by default)."""
    try:
        from modules import paths_internal
        return paths_internal.data_path
    except Exception:
        from modules import shared
        return getattr(shared.cmd_opts, "data_dir", None) or os.getcwd()


def models_dir() -> str:
    try:
        from modules import paths_internal
        return paths_internal.models_path
    except Exception:
        return os.path.join(data_dir(), "models")


def model_dirs() -> List[Path]:
    return [Path(models_dir()) / MODEL_FOLDER]


def insightface_dirs() -> List[Path]:
    """Where WebUI users keep InsightFace packs (ReActor, IP-Adapter FaceID, InstantID)."""
    return [Path(models_dir()) / "insightface"]


HOST = Host(user_dir=data_dir, model_dirs=model_dirs, insightface_dirs=insightface_dirs,
            error=ConsentGuardError, ui_name="WebUI")


def home() -> Path:
    return HOST.home()


HOOKS: dict = {}  # what the checks put in place: name -> "installed" or why not (checks.py)


def status() -> dict:
    """The adapter's own state, for the tab's status (a1111_adapter/ui_tab.py): whether its
    hooks are in place and what enforce mode changed."""
    try:
        from modules import shared
        previews = bool(getattr(shared.opts, "live_previews_enable", False))
    except Exception:
        previews = None
    return {"adapter": SOURCE, "hooks": dict(HOOKS), "live_previews": previews}


def get_engine():
    """The process's engine (shared with everything in this WebUI); ConsentGuardError when
    the policy, the registry or the audit log cannot be used: nothing runs unchecked."""
    return HOST.get_engine()


def contact() -> str:
    return HOST.contact()


def enforce_on() -> bool:
    return HOST.enforce_on(get_engine)


def ui_locale() -> Optional[str]:
    """The WebUI's localization setting ("ko_KR", ...), or None (English) when unset."""
    try:
        from modules import shared
        value = getattr(shared.opts, "localization", None)
    except Exception:
        return None
    return value if isinstance(value, str) and value not in ("", "None") else None


def interrupt() -> None:
    """Stop the running job the way the Interrupt button does: the batch loop ends before it
    samples (processing.py process_images_inner: `if state.interrupted: break`)."""
    from modules import shared
    shared.state.interrupt()


def previews_off() -> bool:
    """Turn the live previews off (enforce mode: a preview is an unchecked picture). True
    when they were on. Not saved to config.json: enforce mode turns them off at every start
    and every job, and the WebUI's own setting comes back when enforce mode is off."""
    from modules import shared
    was = bool(getattr(shared.opts, "live_previews_enable", False))
    if was:
        try:
            shared.opts.live_previews_enable = False
        except Exception:  # --freeze-settings makes Options refuse; the value is in .data
            shared.opts.data["live_previews_enable"] = False
        log.warning("Consent Guard: enforce mode is on, so live previews are turned off.")
    return was


def keep_extras_script(name: str) -> None:
    """Extras scripts can be switched off by name in Settings (postprocessing_disable_in_extras);
    in enforce mode Consent Guard's own gate is never among them."""
    from modules import shared
    names = list(getattr(shared.opts, "postprocessing_disable_in_extras", None) or [])
    if name in names:
        shared.opts.postprocessing_disable_in_extras = [n for n in names if n != name]
        log.warning("Consent Guard: enforce mode is on, so its Extras check stays on.")


def toast(text: str) -> None:
    """Show `text` as a gradio warning toast when the job runs from the UI (gradio >= 3.40
    has gr.Warning; outside an event, or in API mode, it only logs)."""
    try:
        import gradio as gr
        warn = getattr(gr, "Warning", None)
        if warn is not None:
            warn(text)
    except Exception:  # not in a gradio event: nothing to show it in
        pass
