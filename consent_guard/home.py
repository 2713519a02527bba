"""Where Consent Guard keeps its state: the policy, the admin's lock and record, the identity
registry and the audit log (the "home" folder).

ComfyUI reads `<ComfyUI>/user/consent_guard` (its `folder_paths.get_user_directory()` is
`<base>/user`, where the base is the ComfyUI folder or `--base-directory`). The command line
must read the same folder, or doctor reports problems that are not there and an admin locks a
folder ComfyUI never reads. So the CLI looks, in this order, at:

1. `$CONSENT_GUARD_HOME` (always first: a launcher or a service sets it for both sides);
2. the user folder a UI gives (the ComfyUI adapter passes `get_user_directory()`);
3. `--comfyui DIR` on the command line: `DIR/user/consent_guard`; `--webui DIR` (AUTOMATIC1111
   / Forge): `DIR/consent_guard`, what the WebUI adapter uses (a1111_adapter/bridge.py: its
   data folder, the WebUI folder unless it was started with `--data-dir`);
4. the ComfyUI this package is installed in: the package lives in
   `<ComfyUI>/custom_nodes/<plugin>/consent_guard/` (a ComfyUI-Manager install, whose
   `pip install -e` keeps the code there), or Python runs from a venv inside the ComfyUI
   folder (`<ComfyUI>/venv`, `.venv`) or beside it (the Windows portable build's
   `python_embeded` next to `ComfyUI/`); else the WebUI it is installed in
   (`<webui>/extensions/<plugin>/consent_guard/`);
5. the platform's configuration folder (`~/.config/consent-guard` on Linux).

A WebUI started with `--data-dir X` uses `X/consent_guard`: give `--webui X`, or set
CONSENT_GUARD_HOME for both.

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


def webui_home(webui: Path) -> Path:
    """The home the AUTOMATIC1111 / Forge adapter uses: `<WebUI data folder>/consent_guard`."""
    return Path(webui) / HOME_FOLDER


def looks_like_webui(folder: Path) -> bool:
    """An AUTOMATIC1111 / Forge folder (webui.py beside modules/), or a `--data-dir` the
    WebUI has used (config.json and extensions/ in it)."""
    folder = Path(folder)
    if (folder / "webui.py").is_file() and (folder / "modules").is_dir():
        return True
    return (folder / "config.json").is_file() and (folder / "extensions").is_dir()


def check_webui_dir(value: str) -> Path:
    """`--webui DIR`, checked like `--comfyui`."""
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise HomeError(f"--webui {value}: no such folder. Give the AUTOMATIC1111 / Forge "
                        f"folder (the one with webui.py and extensions/), or its --data-dir.")
    if not looks_like_webui(folder):
        raise HomeError(f"--webui {value}: this is not an AUTOMATIC1111 / Forge folder (no "
                        f"webui.py and modules/, nor config.json and extensions/). Give that "
                        f"folder, or set {ENV_HOME}.")
    return folder.resolve()


def installed_webui(module_file: Optional[str] = None) -> Optional[tuple]:
    """(WebUI folder, how it was found) when this package lives in `<webui>/extensions/<x>/`."""
    for plugin in _plugin_candidates(module_file or __file__):
        ext = plugin.parent
        if ext.name == "extensions" and looks_like_webui(ext.parent):
            return ext.parent, f"this extension is installed in {ext}"
    return None


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
                module_file: Optional[str] = None, prefix: Optional[str] = None,
                webui: Optional[str] = None) -> HomeChoice:
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
    if webui:
        folder = check_webui_dir(webui)
        return HomeChoice(webui_home(folder), f"--webui {webui}")
    found = installed_comfyui(module_file, prefix)
    if found:
        folder, why = found
        return HomeChoice(comfyui_home(folder), f"the ComfyUI at {folder} ({why})", folder)
    found = installed_webui(module_file)
    if found:
        folder, why = found
        return HomeChoice(webui_home(folder), f"the WebUI at {folder} ({why})")
    return HomeChoice(platform_config_dir(), "no ComfyUI or WebUI found around this "
                      f"installation (give --comfyui DIR / --webui DIR, or set {ENV_HOME})")


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
    return choose_home(comfyui=getattr(args, "comfyui", None),
                       webui=getattr(args, "webui", None)).path
