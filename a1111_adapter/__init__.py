"""The AUTOMATIC1111 / Forge adapter of Consent Guard (the repo root is also an A1111 extension
folder). The WebUI loads every .py in `scripts/` by path, with the WebUI folder on sys.path but
not the extension folder, so each script file first puts the extension folder on sys.path
with these three lines, then imports this package:

    import os, sys
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.append(_root) if _root not in sys.path else None

Appended, not inserted: the WebUI's own modules always win a name clash. `check_imports()`
then makes sure that `consent_guard` comes from this extension folder (and not, say, from an
older copy installed with pip), so both script files share one engine.

Modules: bridge.py (what the adapter needs from the WebUI: folders, options, the job state,
the shared Host), checks.py (the checks of a job's texts, source pictures and outputs, turned
into the WebUI's actions: interrupt, placeholders, the API error). The tab, settings and API
routes are ui_tab.py and api_routes.py.
"""
from __future__ import annotations

import os
import sys

EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_on_path() -> str:
    """Put the extension folder on sys.path (appended) and return it."""
    if EXTENSION_ROOT not in sys.path:
        sys.path.append(EXTENSION_ROOT)
    return EXTENSION_ROOT


def _from_here(module) -> bool:
    got = os.path.realpath(os.path.dirname(os.path.dirname(module.__file__)))
    return got == os.path.realpath(EXTENSION_ROOT)


def check_imports() -> None:
    """Make sure `consent_guard` is this extension's own copy: two copies would mean two
    engines, two views of the admin lock, and checks that disagree. Another copy found first
    (an older one installed with pip) is set aside for this one, with a warning; ImportError
    when that cannot be done (the script then does not load: `consent-guard doctor` says so)."""
    ensure_on_path()
    import consent_guard

    if _from_here(consent_guard):
        return
    other = consent_guard.__file__
    for name in [k for k in sys.modules if k == "consent_guard" or k.startswith("consent_guard.")]:
        del sys.modules[name]
    sys.path.insert(0, EXTENSION_ROOT)
    try:
        import consent_guard as own
    finally:
        sys.path.pop(0)
    if not _from_here(own):
        raise ImportError(f"Consent Guard: `consent_guard` is imported from {own.__file__}, "
                          f"not from this extension ({EXTENSION_ROOT}). Uninstall the other "
                          f"copy (pip uninstall comfyui-consent-guard) and restart the WebUI.")
    import logging

    logging.getLogger("consent_guard").warning(
        "Consent Guard: another copy of consent_guard (%s) was set aside for this "
        "extension's own; uninstall it (pip uninstall comfyui-consent-guard)", other)
