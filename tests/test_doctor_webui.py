"""`consent-guard doctor --webui`: the A1111/Forge extension present (also renamed), not
disabled by config.json (or Forge's always-disabled list), and no running webui started with
--disable-extra-extensions / --disable-all-extensions (in its cmdline or COMMANDLINE_ARGS).
A fake webui folder stands in for A1111/Forge; one test starts a real process named launch.py
so that /proc reading is exercised."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consent_guard import doctor


def make_webui(tmp_path: Path, ext_name: str = "consent-guard", where: str = "extensions",
               config=None) -> Path:
    webui = tmp_path / "webui"
    (webui / "extensions").mkdir(parents=True)
    (webui / "launch.py").write_text("import time\ntime.sleep(60)\n")
    if ext_name:
        ext = webui / where / ext_name
        (ext / "scripts").mkdir(parents=True)
        (ext / "scripts" / "consent_guard_checks.py").write_text("# stand-in\n")
    if config is not None:
        (webui / "config.json").write_text(json.dumps(config))
    return webui


def by_name(checks, name):
    found = [c for c in checks if c.name == name]
    assert found, f"no check {name!r} in {[c.name for c in checks]}"
    return found[0]


def no_processes():
    return []


def checks_of(webui, cmdlines=no_processes, home=None):
    return doctor.webui_checks(webui, home or webui / "consent_guard", cmdlines)[0]


@pytest.fixture(autouse=True)
def no_home_env(monkeypatch):
    monkeypatch.delenv("CONSENT_GUARD_HOME", raising=False)


def test_present_under_any_folder_name_and_no_config_yet(tmp_path):
    webui = make_webui(tmp_path, ext_name="my-renamed-guard")
    checks = checks_of(webui)
    ext = by_name(checks, "webui extension")
    assert ext.status == doctor.OK and ext.detail.endswith("my-renamed-guard")
    assert by_name(checks, "webui settings").status == doctor.OK
    assert by_name(checks, "webui running").status == doctor.SKIP
    assert by_name(checks, "webui home").status == doctor.OK


def test_missing_extension_fails(tmp_path):
    webui = make_webui(tmp_path, ext_name="")
    (webui / "extensions" / "other-extension" / "scripts").mkdir(parents=True)
    ext = by_name(checks_of(webui), "webui extension")
    assert ext.status == doctor.FAIL and "not found" in ext.detail and ext.fix


def test_a_missing_webui_folder_fails(tmp_path):
    ext = by_name(checks_of(tmp_path / "nowhere"), "webui extension")
    assert ext.status == doctor.FAIL and "no webui folder" in ext.detail


@pytest.mark.parametrize("config, why", [
    ({"disabled_extensions": ["consent-guard"]}, "disabled_extensions"),
    ({"disable_all_extensions": "extra"}, "disable_all_extensions"),
    ({"disable_all_extensions": "all"}, "disable_all_extensions"),
])
def test_config_json_that_disables_it_fails(tmp_path, config, why):
    webui = make_webui(tmp_path, config=config)
    check = by_name(checks_of(webui), "webui settings")
    assert check.status == doctor.FAIL and why in check.detail and "Extensions tab" in check.fix


def test_config_json_disabling_other_extensions_is_fine(tmp_path):
    webui = make_webui(tmp_path, config={"disabled_extensions": ["sd-webui-other"],
                                         "disable_all_extensions": "none"})
    assert by_name(checks_of(webui), "webui settings").status == doctor.OK


def test_a_renamed_folder_is_disabled_by_its_new_name(tmp_path):
    webui = make_webui(tmp_path, ext_name="guard2",
                       config={"disabled_extensions": ["guard2"]})
    assert by_name(checks_of(webui), "webui settings").status == doctor.FAIL


def test_builtin_extension_survives_disable_extra_only(tmp_path):
    webui = make_webui(tmp_path, where="extensions-builtin",
                       config={"disable_all_extensions": "extra"})
    assert by_name(checks_of(webui), "webui settings").status == doctor.OK
    (webui / "config.json").write_text(json.dumps({"disable_all_extensions": "all"}))
    assert by_name(checks_of(webui), "webui settings").status == doctor.FAIL


def test_unreadable_config_fails_closed(tmp_path):
    webui = make_webui(tmp_path)
    (webui / "config.json").write_text("{not json")
    check = by_name(checks_of(webui), "webui settings")
    assert check.status == doctor.FAIL and "cannot be read" in check.detail


def test_forge_always_disabled_names(tmp_path):
    webui = make_webui(tmp_path, ext_name="sd-webui-controlnet")
    (webui / "modules_forge").mkdir()
    (webui / "modules_forge" / "config.py").write_text(
        "always_disabled_extensions = [\n    'sd-webui-controlnet',\n    'other',\n]\n")
    assert doctor.forge_always_disabled(webui) == ["sd-webui-controlnet", "other"]
    check = by_name(checks_of(webui), "webui settings")
    assert check.status == doctor.FAIL and "Forge never loads" in check.detail


def proc(webui, *args, environ="", cwd=None, pid=4242, home_env=""):
    return {"pid": pid, "argv": ["python", "launch.py", *args], "cwd": str(cwd or webui),
            "environ": environ, "home_env": home_env}


@pytest.mark.parametrize("args, flag", [
    (("--disable-extra-extensions",), "--disable-extra-extensions"),
    (("--api", "--disable-all-extensions"), "--disable-all-extensions"),
    (("--disable-extra",), "--disable-extra-extensions"),  # argparse takes abbreviations
    (("--disable-al",), "--disable-all-extensions"),
])
def test_running_webui_with_a_disabling_flag_fails(tmp_path, args, flag):
    webui = make_webui(tmp_path)
    check = by_name(checks_of(webui, lambda: [proc(webui, *args)]), "webui arguments")
    assert check.status == doctor.FAIL and flag in check.detail and "4242" in check.detail


def test_other_disable_flags_do_not_count(tmp_path):
    webui = make_webui(tmp_path)
    check = by_name(checks_of(webui, lambda: [proc(webui, "--disable-nan-check",
                                                   "--disable-safe-unpickle", "--api")]),
                    "webui arguments")
    assert check.status == doctor.OK and "1 webui process" in check.detail


def test_a_process_of_another_webui_is_ignored(tmp_path):
    webui = make_webui(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    checks = checks_of(webui, lambda: [proc(webui, "--disable-all-extensions", cwd=other)])
    assert by_name(checks, "webui running").status == doctor.SKIP


def test_data_dir_decides_which_webui_a_process_runs(tmp_path):
    webui = make_webui(tmp_path)
    code = tmp_path / "code"
    code.mkdir()
    p = proc(webui, "--data-dir", str(webui), "--disable-extra-extensions", cwd=code)
    assert by_name(checks_of(webui, lambda: [p]), "webui arguments").status == doctor.FAIL
    p2 = proc(webui, "--data-dir", str(code), "--disable-extra-extensions", cwd=webui)
    assert by_name(checks_of(webui, lambda: [p2]), "webui running").status == doctor.SKIP


def test_unreadable_environment_is_a_warning(tmp_path):
    webui = make_webui(tmp_path)
    check = by_name(checks_of(webui, lambda: [proc(webui, environ=None)]), "webui arguments")
    assert check.status == doctor.WARN and "COMMANDLINE_ARGS were not checked" in check.detail


def test_another_settings_file_is_checked_too(tmp_path):
    webui = make_webui(tmp_path, config={})
    other = tmp_path / "other-config.json"
    other.write_text(json.dumps({"disabled_extensions": ["consent-guard"]}))
    checks = checks_of(webui, lambda: [proc(webui, "--ui-settings-file", str(other))])
    settings = [c for c in checks if c.name == "webui settings"]
    assert [c.status for c in settings] == [doctor.OK, doctor.FAIL]
    assert str(other) in settings[1].detail


def test_home_the_webui_uses(tmp_path, monkeypatch):
    webui = make_webui(tmp_path)
    elsewhere = tmp_path / "home"
    check = by_name(checks_of(webui, home=elsewhere), "webui home")
    assert check.status == doctor.FAIL and str(webui / "consent_guard") in check.detail
    # a running webui's own CONSENT_GUARD_HOME decides
    running = lambda: [proc(webui, home_env=str(elsewhere))]  # noqa: E731
    assert by_name(checks_of(webui, running, home=elsewhere), "webui home").status == doctor.OK
    assert by_name(checks_of(webui, running), "webui home").status == doctor.FAIL
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(elsewhere))
    assert by_name(checks_of(webui, home=elsewhere), "webui home").status == doctor.INFO


def test_webui_home_for_the_command_line(tmp_path, monkeypatch):
    assert doctor.webui_home(tmp_path) == tmp_path / "consent_guard"
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "elsewhere"))
    assert doctor.webui_home(tmp_path) == tmp_path / "elsewhere"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_real_process_commandline_args_from_its_environment(tmp_path):
    """webui appends COMMANDLINE_ARGS to sys.argv itself: /proc/<pid>/cmdline does not show
    them, so doctor reads the process's environment."""
    webui = make_webui(tmp_path)
    env = dict(os.environ, COMMANDLINE_ARGS="--api --disable-extra-extensions")
    child = subprocess.Popen([sys.executable, "launch.py", "--port", "7999"], cwd=webui,
                             env=env)
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            mine = [p for p in doctor._webui_cmdlines() if p["pid"] == child.pid]
            if mine and "launch.py" in " ".join(mine[0]["argv"]):
                break
            time.sleep(0.05)
        assert mine and "--disable-extra-extensions" in mine[0]["argv"]
        check = by_name(checks_of(webui, doctor._webui_cmdlines), "webui arguments")
        assert check.status == doctor.FAIL and str(child.pid) in check.detail
    finally:
        child.kill()
        child.wait()


def test_run_with_only_a_webui(tmp_path):
    webui = make_webui(tmp_path, config={"disable_all_extensions": "all"})
    home = webui / "consent_guard"
    checks = doctor.run(home, webui=webui, webui_cmdlines=no_processes,
                        cmdlines=lambda: pytest.fail("ComfyUI processes were looked for"))
    names = [c.name for c in checks]
    assert "plugin folder" not in names and "ComfyUI running" not in names
    assert by_name(checks, "webui settings").status == doctor.FAIL
    assert by_name(checks, "webui extension").status == doctor.OK


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_whoever_can_write_config_json_can_switch_it_off(tmp_path):
    webui = make_webui(tmp_path, config={})
    home = webui / "consent_guard"
    home.mkdir()
    (home / "policy.toml").write_text("version = 1\n")  # set up enough not to be "fresh"
    guarded = [home, home / "policy.toml", webui / "extensions", webui / "config.json"]
    guarded += [p for p in (webui / "extensions").rglob("*")]
    if os.geteuid() == 0:  # run as root: only what another account owns counts
        os.chown(webui / "config.json", 65534, -1)
    else:
        for path in guarded:
            if path != webui / "config.json":
                path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        checks = doctor.run(home, webui=webui, webui_cmdlines=no_processes)
    finally:
        for path in guarded:
            path.chmod(0o755 if path.is_dir() else 0o644)
    perms = by_name(checks, "file permissions")
    assert perms.status == doctor.FAIL
    assert perms.detail.startswith("1 path(s)") and str(webui / "config.json") in perms.detail
