"""Where Consent Guard keeps its state (policy, and later the registry and the audit log)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

ENV_HOME = "CONSENT_GUARD_HOME"


def platform_config_dir() -> Path:
    if sys.platform == "win32":
        base = os.environ.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
        return Path(base) / "ConsentGuard"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "ConsentGuard"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "consent-guard"


def resolve_home(ui_user_dir: Optional[str] = None) -> Path:
    """`CONSENT_GUARD_HOME` if set, else `<UI user directory>/consent_guard` when a UI gives
    one (ComfyUI's `folder_paths.get_user_directory()`), else the platform config folder."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    if ui_user_dir:
        return Path(ui_user_dir) / "consent_guard"
    return platform_config_dir()
