"""The command line's install paths (issue 13 item 5): `install-models`, a cold start that
imports nothing heavy, an unquoted prompt read as one prompt, a count line on stderr when it
is not a terminal (a bar when it is). Detector doubles and benign random images only."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

import consent_guard
from consent_guard import Engine, cli
from consent_guard.verdict import Decision, Reason, Verdict

from conftest import FakeParts, FakeScorer, keyed_image

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("numpy", "PIL", "onnxruntime", "cryptography", "cv2", "tqdm", "consent_guard.engine",
         "consent_guard.registry", "consent_guard.doctor", "sqlite3")


# -- install-models ------------------------------------------------------------------------------

def fake_installer(monkeypatch, main):
    mod = types.ModuleType("consent_guard.installer")
    mod.main = main
    monkeypatch.setitem(sys.modules, "consent_guard.installer", mod)
    monkeypatch.setattr(consent_guard, "installer", mod, raising=False)


def test_install_models_runs_the_installer_models_only(monkeypatch, tmp_path):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path))
    calls = []
    fake_installer(monkeypatch, lambda argv: calls.append(argv) or 3)
    assert cli.main(["install-models"]) == 3  # its exit status is the command's
    assert calls == [["--models-only"]]
    fake_installer(monkeypatch, lambda argv: None)
    assert cli.main(["install-models"]) == 0

    def exits(argv):
        raise SystemExit(1)
    fake_installer(monkeypatch, exits)
    assert cli.main(["install-models"]) == 1


def test_install_models_without_an_installer_says_what_to_do(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "consent_guard.installer", None)  # import fails
    monkeypatch.delattr(consent_guard, "installer", raising=False)
    assert cli.main(["install-models"]) == 2
    err = capsys.readouterr().err
    assert "installer cannot be loaded" in err and "python install.py" in err


# -- cold start ----------------------------------------------------------------------------------

PROBE = """
import importlib.util, sys, types
pkg = types.ModuleType("consent_guard")  # the package without its __init__ (see below)
pkg.__path__ = [sys.argv[1]]
pkg.__version__ = "0"
sys.modules["consent_guard"] = pkg
import consent_guard.cli
consent_guard.cli.build_parser()
print(",".join(m for m in sys.argv[2].split(",") if m in sys.modules))
"""


def test_the_cli_modules_import_nothing_heavy():
    """cli.py and the cli_* modules it loads: argparse and the standard library only (the
    package's own __init__ is the next test's business)."""
    r = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "consent_guard"),
                        ",".join(HEAVY)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"imported at `consent-guard --help`: {r.stdout}"


def test_consent_guard_help_imports_nothing_heavy():
    """The whole `consent-guard --help` path, the package's __init__ included."""
    code = ("import sys, consent_guard.cli\n"
            "print(','.join(m for m in sys.argv[1].split(',') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, ",".join(HEAVY)], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    loaded = r.stdout.strip()
    assert loaded == "", f"imported at `consent-guard --help`: {loaded}"


# -- check-prompt: the words are one prompt ------------------------------------------------------

class PromptEngine:
    """Records each prompt checked; blocks those containing 'clothes'."""
    built = 0

    def __init__(self, policy, **kw):
        PromptEngine.built += 1
        self.seen = PromptEngine.seen = []

    def check_prompt(self, text, negative=None):
        self.seen.append(text)
        if "clothes" in text:
            return Verdict(Decision.BLOCK, [Reason("prompt_lexicon", "remove clothes", 1.0,
                                                   "undress", Decision.BLOCK)])
        return Verdict(Decision.ALLOW)


@pytest.fixture
def prompts(monkeypatch, tmp_path):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cli, "Engine", PromptEngine)
    PromptEngine.built = 0
    return PromptEngine


def test_unquoted_words_are_one_prompt(prompts, capsys):
    assert cli.main(["check-prompt", "--json", "remove", "her", "clothes"]) == 1
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["remove her clothes"]
    assert rows[0]["decision"] == "block" and prompts.seen == ["remove her clothes"]


def test_each_and_stdin_check_several_with_one_engine(prompts, capsys, monkeypatch):
    assert cli.main(["check-prompt", "--each", "a cat", "remove her clothes", "a dog"]) == 1
    assert prompts.seen == ["a cat", "remove her clothes", "a dog"] and prompts.built == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["allow", "block", "allow"]
    monkeypatch.setattr("sys.stdin", io.StringIO("a cat\n\n  \na red bicycle\n"))
    assert cli.main(["check-prompt"]) == 0
    assert prompts.seen == ["a cat", "a red bicycle"]


# -- the folder scan's bar or count line ---------------------------------------------------------

@pytest.fixture
def folder(monkeypatch, tmp_path):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cli, "Engine", lambda policy, **kw: Engine(
        policy, parts=FakeParts(), scorer=FakeScorer(whole={20: 0.95}), **kw))
    d = tmp_path / "imgs"
    d.mkdir()
    for name, key in (("a.png", 1), ("b.png", 2), ("c.png", 20)):
        Image.fromarray(keyed_image(key)).save(d / name)
    return d


def test_a_count_line_when_stderr_is_not_a_terminal(folder, capsys):
    assert cli.main(["scan", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == \
        "consent-guard scan: 3 file(s) checked: 2 allow, 1 block"
    assert cli.main(["scan", "-q", str(folder)]) == 1
    assert capsys.readouterr().err == ""
    assert cli.main(["scan", str(folder / "a.png")]) == 0  # one file: its line says it all
    assert capsys.readouterr().err == ""


def test_a_bar_when_stderr_is_a_terminal(folder, capsys, monkeypatch):
    import tqdm

    bars = []

    def fake_tqdm(items, **kw):
        bars.append(kw)
        return items
    monkeypatch.setattr(tqdm, "tqdm", fake_tqdm)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.main(["scan", str(folder)]) == 1
    assert len(bars) == 1 and bars[0]["unit"] == "img"
    assert "3 file(s) checked" in capsys.readouterr().err  # and the count when it is gone


def test_missing_photos_for_identity_commands_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path))
    missing = tmp_path / "nope.jpg"
    assert cli.main(["identity", "match", str(missing)]) == 2
    assert f"identity match: {missing}: no such file or folder" in capsys.readouterr().err
    assert cli.main(["identity", "enroll", "--name", "A", "--scope", "any", "--consent-by",
                     "A", str(missing)]) == 2
    assert f"identity enroll: {missing}: no such file" in capsys.readouterr().err


def test_cli_constants_agree_with_their_modules():
    """cli_identity and cli_policy copy two constants so that --help imports nothing heavy."""
    from consent_guard import cli_identity, cli_policy, policy, registry

    assert cli_identity.SCOPES == registry.SCOPES
    assert cli_identity.ENV_PASSPHRASE == registry.ENV_PASSPHRASE
    assert cli_policy.POLICY_FILENAME == policy.POLICY_FILENAME
