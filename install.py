"""Installs what Consent Guard needs into the running Python, and says what it did.

Run by ComfyUI-Manager (after it pip-installs requirements.txt) and by A1111 at install; by
hand: `python install.py` (`--dev` for tests, `--models-only` for the models alone,
`--no-cli` to skip the `consent-guard` command). The work is done by
consent_guard/installer.py; see its docstring for the steps.

installer.py is loaded by its path, not imported as consent_guard.installer: importing the
consent_guard package imports the engine, which needs numpy and the rest that this installs.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _installer():
    spec = importlib.util.spec_from_file_location("consent_guard_installer",
                                                  HERE / "consent_guard" / "installer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(_installer().main())
