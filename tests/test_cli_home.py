"""One home folder for ComfyUI and the command line (issue 13 item 3): the CLI finds the
ComfyUI it is installed in (plugin inside custom_nodes -> that ComfyUI's user/consent_guard),
takes `--comfyui DIR`, keeps $CONSENT_GUARD_HOME first, and says which home it uses and why.
Folders only: no images."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from consent_guard import cli
from consent_guard.home import (ENV_HOME, HomeError, choose_home, installed_comfyui,
                                platform_config_dir, resolve_home)

REPO = Path(__file__).resolve().parent.parent


def comfyui(base: Path, source: bool = True) -> Path:
    """A ComfyUI folder: a source checkout (main.py, folder_paths.py) or, with source=False, a
    --base-directory ComfyUI has used (custom_nodes and user only)."""
    (base / "custom_nodes").mkdir(parents=True)
    if source:
        (base / "main.py").write_text("# ComfyUI\n")
        (base / "folder_paths.py").write_text("# ComfyUI\n")
    else:
        (base / "user").mkdir()
    return base


def plugin_file(base: Path, folder: str = "ComfyUI-Consent-Guard") -> str:
    """Where home.py sits when the plugin is in <base>/custom_nodes/<folder>."""
    pkg = base / "custom_nodes" / folder / "consent_guard"
    pkg.mkdir(parents=True)
    (pkg / "home.py").write_text("")
    return str(pkg / "home.py")


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_HOME, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return tmp_path


def test_plugin_in_custom_nodes_uses_that_comfyuis_user_folder(no_env):
    base = comfyui(no_env / "ComfyUI")
    choice = choose_home(module_file=plugin_file(base), prefix=str(no_env / "py"))
    assert choice.path == base / "user" / "consent_guard"
    assert choice.comfyui == base and "custom_nodes" in choice.reason


def test_a_base_directory_layout_is_found_too(no_env):
    base = comfyui(no_env / "data", source=False)
    choice = choose_home(module_file=plugin_file(base), prefix=str(no_env / "py"))
    assert choice.path == base / "user" / "consent_guard"


def test_a_custom_nodes_folder_outside_any_comfyui_is_not_taken_for_one(no_env):
    """e.g. a shared custom_nodes folder named in extra_model_paths.yaml: its parent is not
    the ComfyUI, so its user/ would be a folder ComfyUI never reads."""
    shared = no_env / "shared"
    (shared / "custom_nodes").mkdir(parents=True)
    choice = choose_home(module_file=plugin_file(shared), prefix=str(no_env / "py"))
    assert choice.path == no_env / "xdg" / "consent-guard" == platform_config_dir()
    assert choice.comfyui is None and "--comfyui" in choice.reason


def test_a_plugin_linked_into_custom_nodes_is_found_through_the_link(no_env):
    base = comfyui(no_env / "ComfyUI")
    real = Path(plugin_file(no_env / "elsewhere"))  # the checkout lives elsewhere
    (base / "custom_nodes" / "CG").symlink_to(real.parent.parent, target_is_directory=True)
    linked = base / "custom_nodes" / "CG" / "consent_guard" / "home.py"
    assert choose_home(module_file=str(linked), prefix=str(no_env / "py")).comfyui == base
    # and the other way round: the link is what Python imported, the plugin is real
    assert installed_comfyui(str(real), prefix=str(no_env / "py")) is None


def test_a_venv_inside_or_beside_comfyui(no_env):
    base = comfyui(no_env / "ComfyUI")
    (base / "venv").mkdir()
    found = installed_comfyui(str(no_env / "site" / "consent_guard" / "home.py"),
                              prefix=str(base / "venv"))
    assert found is not None and found[0] == base.resolve()
    portable = no_env / "ComfyUI_windows_portable"
    inner = comfyui(portable / "ComfyUI")
    (portable / "python_embeded").mkdir()
    found = installed_comfyui(str(no_env / "site" / "x" / "home.py"),
                              prefix=str(portable / "python_embeded"))
    assert found is not None and found[0] == inner.resolve()


def test_env_comes_first_then_the_uis_folder_then_comfyui_option(no_env, monkeypatch):
    base = comfyui(no_env / "ComfyUI")
    monkeypatch.setenv(ENV_HOME, str(no_env / "from_env"))
    assert choose_home(comfyui=str(base)).path == no_env / "from_env"
    assert resolve_home(str(no_env / "ui_user")) == no_env / "from_env"
    monkeypatch.delenv(ENV_HOME)
    # the ComfyUI adapter (nodes/comfy_bridge.py) passes folder_paths.get_user_directory()
    assert resolve_home(str(no_env / "ui_user")) == no_env / "ui_user" / "consent_guard"
    assert resolve_home(comfyui=str(base)) == base.resolve() / "user" / "consent_guard"


def test_comfyui_option_must_name_a_comfyui_folder(no_env):
    with pytest.raises(HomeError, match="no such folder"):
        choose_home(comfyui=str(no_env / "nope"))
    (no_env / "plain").mkdir()
    with pytest.raises(HomeError, match="not a ComfyUI folder"):
        choose_home(comfyui=str(no_env / "plain"))


def test_cli_comfyui_option_where_and_errors(no_env, capsys):
    base = comfyui(no_env / "ComfyUI")
    assert cli.main(["--comfyui", str(base), "where", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"home": str(base.resolve() / "user" / "consent_guard"),
                   "reason": f"--comfyui {base}", "comfyui": str(base.resolve()),
                   "exists": False}
    assert cli.main(["--comfyui", str(no_env / "nope"), "where"]) == 2
    assert f"--comfyui {no_env / 'nope'}: no such folder" in capsys.readouterr().err
    # every command works on that home: policy init writes into ComfyUI's user folder
    assert cli.main(["--comfyui", str(base), "policy", "init"]) == 0
    assert (base / "user" / "consent_guard" / "policy.toml").is_file()
    assert cli.main(["--comfyui", str(base), "where"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().endswith(str(Path("user") / "consent_guard"))
    assert "why: --comfyui" in out.err and "does not exist yet" not in out.err


def test_doctor_takes_comfyui_after_the_command_too(no_env, capsys, monkeypatch):
    from consent_guard import doctor

    base = comfyui(no_env / "ComfyUI")
    monkeypatch.setattr(doctor, "_proc_cmdlines", lambda: [])
    cli.main(["doctor", "--comfyui", str(base), "--json"])
    rows = {r["check"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["home"]["detail"].startswith(str(base.resolve() / "user" / "consent_guard"))
    assert str(base / "custom_nodes") in rows["plugin folder"]["detail"]  # not found there


def test_the_real_package_in_a_comfyui_finds_it(no_env):
    """End to end: this package linked into a ComfyUI's custom_nodes, run with
    `python -m consent_guard` from the plugin folder (as ComfyUI-Manager leaves it)."""
    base = comfyui(no_env / "ComfyUI")
    plugin = base / "custom_nodes" / "ComfyUI-Consent-Guard"
    plugin.mkdir()
    (plugin / "consent_guard").symlink_to(REPO / "consent_guard", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != ENV_HOME}
    r = subprocess.run([sys.executable, "-m", "consent_guard", "where", "--json"], cwd=plugin,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["home"] == str(base / "user" / "consent_guard"), out
    assert "installed in" in out["reason"]


def test_where_notes_the_comfyuis_own_home_when_the_env_points_elsewhere(no_env, monkeypatch,
                                                                        capsys):
    from consent_guard import home as home_mod

    base = comfyui(no_env / "ComfyUI")
    monkeypatch.setenv(ENV_HOME, str(no_env / "elsewhere"))
    monkeypatch.setattr(home_mod, "installed_comfyui", lambda *a: (base, "test"))
    assert cli.main(["where"]) == 0
    err = capsys.readouterr().err
    assert f"uses {base / 'user' / 'consent_guard'} unless" in err
    monkeypatch.setenv(ENV_HOME, str(base / "user" / "consent_guard"))
    assert cli.main(["where"]) == 0
    assert "note:" not in capsys.readouterr().err


# -- AUTOMATIC1111 / Forge (issue 14): the home the WebUI adapter uses ---------------------------

def webui(base: Path) -> Path:
    (base / "modules").mkdir(parents=True)
    (base / "extensions").mkdir()
    (base / "webui.py").write_text("# the WebUI\n")
    return base


def test_extension_in_a_webui_uses_its_consent_guard_folder(no_env, tmp_path):
    """The adapter's home is <WebUI data folder>/consent_guard (a1111_adapter/bridge.py): the
    CLI of an extension installed there reads the same one."""
    root = webui(tmp_path / "forge")
    pkg = root / "extensions" / "consent-guard" / "consent_guard"
    pkg.mkdir(parents=True)
    choice = choose_home(module_file=str(pkg / "home.py"), prefix=str(tmp_path / "venv"))
    assert choice.path == root / "consent_guard" and "WebUI" in choice.reason


def test_webui_option_and_its_errors(no_env, tmp_path, capsys):
    root = webui(tmp_path / "a1111")
    assert choose_home(webui=str(root)).path == root.resolve() / "consent_guard"
    with pytest.raises(HomeError):
        choose_home(webui=str(tmp_path))  # not a WebUI folder
    data = tmp_path / "data"  # a --data-dir the WebUI has used
    (data / "extensions").mkdir(parents=True)
    (data / "config.json").write_text("{}")
    assert choose_home(webui=str(data)).path == data.resolve() / "consent_guard"
    assert cli.main(["--webui", str(root), "where"]) == 0
    assert capsys.readouterr().out.strip() == str(root.resolve() / "consent_guard")
    assert cli.main(["--webui", str(tmp_path / "missing"), "where"]) == 2
