"""Against the real ComfyUI (skipped unless COMFYUI_DIR is set): with no CONSENT_GUARD_HOME on
either side, the command line finds the same home as the running ComfyUI, because it finds
the ComfyUI its package is installed in (issue 13 item 3), and doctor --url agrees."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_comfyui_integration import COMFYUI_DIR, REPO, Comfy

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")


def cli_through(plugin: Path, *argv: str) -> subprocess.CompletedProcess:
    """The CLI imported from the plugin folder in custom_nodes (as ComfyUI imports it), with
    CONSENT_GUARD_HOME empty, which both sides take as unset."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from consent_guard.cli import main; "
            "sys.exit(main(sys.argv[2:]))")
    env = dict(os.environ, CONSENT_GUARD_HOME="")
    return subprocess.run([sys.executable, "-c", code, str(plugin), *argv], env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_and_comfyui_use_one_home_without_configuration(tmp_path):
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    plugin = base / "custom_nodes" / "ComfyUI-Consent-Guard"
    plugin.symlink_to(REPO, target_is_directory=True)
    server = Comfy(base, "")  # "" : no CONSENT_GUARD_HOME for the server either
    try:
        remote = server.get("/consent_guard/status")["setup"]["home"]
        assert Path(remote) == base / "user" / "consent_guard"
        r = cli_through(plugin, "where", "--json")
        assert r.returncode == 0, r.stderr
        where = json.loads(r.stdout)
        assert Path(where["home"]).resolve() == Path(remote).resolve(), where
        assert "installed in" in where["reason"]
        r = cli_through(plugin, "doctor", "--url", server.url, "--json")
        rows = {c["check"]: c for c in json.loads(r.stdout)}
        assert rows["same home"]["status"] == "ok", rows["same home"]
        assert rows["plugin folder"]["status"] == "ok", rows["plugin folder"]
    finally:
        server.stop()
