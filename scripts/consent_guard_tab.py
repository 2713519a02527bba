"""A1111 / Forge: the Consent Guard tab, its settings section and its HTTP routes
(a1111_adapter/ui_tab.py, a1111_adapter/api_routes.py). The checks themselves are
scripts/consent_guard_checks.py.

webui loads every .py in an extension's scripts/ by path, with the webui folder on sys.path but
not the extension's: so the extension folder goes on sys.path first (appended: webui's own
modules win a name clash; see a1111_adapter/__init__.py)."""
import os
import sys

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(_root) if _root not in sys.path else None

import a1111_adapter  # noqa: E402

a1111_adapter.check_imports()  # this extension's consent_guard, not another copy

from modules import script_callbacks  # noqa: E402  (webui's own module)

from a1111_adapter import api_routes, ui_tab  # noqa: E402

# no name= keyword: A1111 before 1.8 does not take it
script_callbacks.on_ui_tabs(ui_tab.on_ui_tabs)
script_callbacks.on_ui_settings(ui_tab.on_ui_settings)
script_callbacks.on_app_started(api_routes.on_app_started)
