"""Where Consent Guard keeps its state: the policy, the admin's lock and record, the identity
registry and the audit log (the "home" folder).

ComfyUI reads `<ComfyUI>/user/consent_guard` (its `folder_paths.get_user_directory()` is
`<base>/user`, where the base is the ComfyUI folder or `--base-directory`). The command line
must read the same folder, or doctor reports problems that are not there and an admin locks a
folder ComfyUI never reads. So the CLI looks, in this order, at:

1. `$CONSENT_GUARD_HOME` (always first: a launcher or a service sets it for both sides);
2. the user folder a UI gives (the ComfyUI adapter passes `get_user_directory()`);
3. `--comfyui DIR` on the command line: `DIR/user/consent_guard`;
4. the ComfyUI this package is installed in: the package lives in
   `<ComfyUI>/custom_nodes/<plugin>/consent_guard/` (a ComfyUI-Manager install, whose
   `pip install -e` keeps the code there), or Python runs from a venv inside the ComfyUI
   folder (`<ComfyUI>/venv`, `.venv`) or beside it (the Windows portable build's
   `python_embeded` next to `ComfyUI/`);
5. the platform's configuration folder (`~/.config/consent-guard` on Linux).

A ComfyUI started with `--user-directory` elsewhere is not found by 3 or 4: set
CONSENT_GUARD_HOME for both. `consent-guard where` says which folder is used and why.
This module imports nothing heavy: `consent-guard --help` reads it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

ENV_HOME = "CONSENT_GUARD_HOME"
HOME_FOLDER = "consent_guard"  # inside ComfyUI's user directory


class HomeError(ValueError):
    """A home that cannot be used as asked (e.g. --comfyui names no ComfyUI folder)."""


@dataclass(frozen=True)
class HomeChoice:
    """The home folder, and why it was chosen (printed by `where` and doctor)."""
    path: Path
    reason: str
    comfyui: Optional[Path] = None  # the ComfyUI folder it belongs to, when one is known


def platform_config_dir() -> Path:
    if sys.platform == "win32":
        base = os.environ.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
        return Path(base) / "ConsentGuard"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "ConsentGuard"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "consent-guard"


def comfyui_home(comfyui: Path) -> Path:
    """The home ComfyUI itself uses: `<ComfyUI>/user/consent_guard`."""
    return Path(comfyui) / "user" / HOME_FOLDER


def looks_like_comfyui(folder: Path) -> bool:
    """A ComfyUI source folder (main.py beside folder_paths.py) or a `--base-directory` that
    ComfyUI has used (custom_nodes and user in it)."""
    folder = Path(folder)
    if (folder / "main.py").is_file() and (folder / "folder_paths.py").is_file():
        return True
    return (folder / "custom_nodes").is_dir() and (folder / "user").is_dir()


def check_comfyui_dir(value: str) -> Path:
    """`--comfyui DIR`, checked: a missing or wrong folder is an error, never a new home."""
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise HomeError(f"--comfyui {value}: no such folder. Give the ComfyUI folder (the one "
                        f"with main.py and custom_nodes/).")
    if not looks_like_comfyui(folder):
        raise HomeError(f"--comfyui {value}: this is not a ComfyUI folder (no main.py and "
                        f"folder_paths.py, nor custom_nodes/ and user/). Give the folder that "
                        f"holds custom_nodes/, or set {ENV_HOME}.")
    return folder.resolve()


def _plugin_candidates(module_file: str) -> List[Path]:
    """The plugin folder (two levels above this file), as imported and with links resolved:
    ComfyUI may reach the plugin through a link in custom_nodes, or the other way round."""
    seen: List[Path] = []
    for p in (Path(os.path.abspath(module_file)), Path(os.path.realpath(module_file))):
        plugin = p.parent.parent
        if plugin not in seen:
            seen.append(plugin)
    return seen


def installed_comfyui(module_file: Optional[str] = None,
                      prefix: Optional[str] = None) -> Optional[tuple]:
    """(ComfyUI folder, how it was found) for the ComfyUI this package is installed in, or
    None. `module_file` and `prefix` default to this file and sys.prefix (tests pass others)."""
    for plugin in _plugin_candidates(module_file or __file__):
        custom = plugin.parent
        if custom.name == "custom_nodes" and looks_like_comfyui(custom.parent):
            return custom.parent, f"this plugin is installed in {custom}"
    venv = Path(prefix or sys.prefix).resolve()
    bases = [venv.parent]  # <ComfyUI>/venv, <ComfyUI>/.venv
    if venv.name == "python_embeded":  # the Windows portable build: beside ComfyUI/
        bases.append(venv.parent / "ComfyUI")
    for base in bases:
        if looks_like_comfyui(base) and (base / "custom_nodes").is_dir():
            return base, f"Python runs from {venv}, which belongs to that ComfyUI"
    return None


def choose_home(ui_user_dir: Optional[str] = None, comfyui: Optional[str] = None,
                module_file: Optional[str] = None, prefix: Optional[str] = None) -> HomeChoice:
    """The home and why (see the module doc for the order). Raises HomeError for a `comfyui`
    that is not a ComfyUI folder."""
    env = os.environ.get(ENV_HOME)
    if env:
        return HomeChoice(Path(env).expanduser(), f"${ENV_HOME} is set")
    if ui_user_dir:
        return HomeChoice(Path(ui_user_dir) / HOME_FOLDER, "the UI's user folder")
    if comfyui:
        folder = check_comfyui_dir(comfyui)
        return HomeChoice(comfyui_home(folder), f"--comfyui {comfyui}", folder)
    found = installed_comfyui(module_file, prefix)
    if found:
        folder, why = found
        return HomeChoice(comfyui_home(folder), f"the ComfyUI at {folder} ({why})", folder)
    return HomeChoice(platform_config_dir(), "no ComfyUI found around this installation "
                      f"(give --comfyui DIR or set {ENV_HOME} to use ComfyUI's)")


def resolve_home(ui_user_dir: Optional[str] = None, comfyui: Optional[str] = None) -> Path:
    """`CONSENT_GUARD_HOME` if set, else `<UI user directory>/consent_guard` when a UI gives
    one (ComfyUI's `folder_paths.get_user_directory()`), else `--comfyui`'s or the installed
    ComfyUI's `user/consent_guard`, else the platform config folder."""
    return choose_home(ui_user_dir, comfyui).path


def home_of(args) -> Path:
    """The home a CLI command works on: the one `cli.main` chose (`args.home`), else chosen
    now (a command function called on its own)."""
    home = getattr(args, "home", None)
    if home is not None:
        return Path(home)
    return choose_home(comfyui=getattr(args, "comfyui", None)).path
