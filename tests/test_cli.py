import json

import pytest
from PIL import Image

from consent_guard import Engine, cli
from consent_guard.detectors.base import PartDetection

from conftest import FakeParts, FakeScorer, keyed_image


@pytest.fixture
def fake_engine(monkeypatch, tmp_path):
    """The CLI with detector doubles: key 10 is censored, key 20 blocked, others allowed."""
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "home"))
    parts = FakeParts({10: [PartDetection("BUTTOCKS_EXPOSED", 0.7, (1, 1, 8, 8))]})
    scorer = FakeScorer(whole={10: 0.5, 20: 0.95})
    monkeypatch.setattr(cli, "Engine",
                        lambda policy, **kw: Engine(policy, parts=parts, scorer=scorer, **kw))


def write(folder, name, key):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(keyed_image(key)).save(folder / name)
    return folder / name


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, [json.loads(line) for line in out.out.splitlines() if line.strip()], out.err


def test_all_allowed_exits_0(fake_engine, tmp_path, capsys):
    write(tmp_path / "imgs", "a.png", 1)
    write(tmp_path / "imgs" / "sub", "b.png", 2)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image, skipped in folders")
    code, rows, _ = run(capsys, "scan", "--json", str(tmp_path / "imgs"))
    assert code == 0 and [r["decision"] for r in rows] == ["allow", "allow"]
    assert set(rows[0]) >= {"path", "decision", "reasons", "regions"}


def test_flagged_exits_1_with_reasons_and_regions(fake_engine, tmp_path, capsys):
    write(tmp_path, "a.png", 1)
    write(tmp_path, "c.png", 10)
    write(tmp_path, "d.png", 20)
    code, rows, _ = run(capsys, "scan", "--json", str(tmp_path))
    assert code == 1
    by = {r["path"].rsplit("/", 1)[1]: r for r in rows}
    assert by["c.png"]["decision"] == "censor" and by["c.png"]["regions"] == [[1, 1, 8, 8]]
    assert by["c.png"]["reasons"][0]["label"] == "BUTTOCKS_EXPOSED"
    assert by["d.png"]["decision"] == "block"
    assert {"check", "label", "score"} <= set(by["d.png"]["reasons"][0])


def test_errors_exit_2_and_every_file_gets_a_line(fake_engine, tmp_path, capsys):
    write(tmp_path, "a.png", 1)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, rows, _ = run(capsys, "scan", "--json", str(tmp_path))
    assert code == 2 and len(rows) == 2
    errors = {r["path"].rsplit("/", 1)[1]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {"broken.png"}
    assert all(r["decision"] == "block" for r in rows if "error" in r)


def test_a_missing_path_is_an_error_naming_it_not_a_block(fake_engine, tmp_path, capsys):
    """A typo is not an image to block (issue 13 item 5): exit 2, the path named, nothing
    scanned, not even the paths that exist."""
    write(tmp_path, "a.png", 1)
    missing = tmp_path / "missing.jpg"
    code, rows, err = run(capsys, "scan", "--json", str(tmp_path), str(missing))
    assert code == 2 and rows == []
    assert f"{missing}: no such file or folder" in err and "nothing was checked" in err
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    code, rows, err = run(capsys, "scan", str(tmp_path / "dangling.png"))
    assert code == 2 and "dangling.png: a broken symbolic link" in err


def test_plain_output_and_policy_flag(fake_engine, tmp_path, capsys):
    write(tmp_path / "i", "c.png", 10)
    pol = tmp_path / "p.toml"
    pol.write_text('[actions]\nnudity = "allow"\n')
    code = cli.main(["scan", "--policy", str(pol), str(tmp_path / "i")])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("allow")


def test_bad_policy_exits_2_with_message(fake_engine, tmp_path, capsys):
    pol = tmp_path / "p.toml"
    pol.write_text('[actions]\nnudity = "maybe"\n')
    code = cli.main(["scan", "--policy", str(pol), str(tmp_path)])
    assert code == 2 and "'maybe' is not one of" in capsys.readouterr().err


def test_policy_init_check_show(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path))
    assert cli.main(["policy", "init"]) == 0
    assert (tmp_path / "policy.toml").exists()
    assert cli.main(["policy", "init"]) == 2  # refuses to overwrite
    assert cli.main(["policy", "check"]) == 0
    capsys.readouterr()
    assert cli.main(["policy", "show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["actions"] == {"sexual": "block", "nudity": "censor"}
    assert cli.main(["policy", "show"]) == 0  # TOML: tests/test_cli_policy_show.py
    assert '[actions]\nsexual = "block"  # default' in capsys.readouterr().out


def test_real_models_scan_benign_package_photos(t1_jpg, astronaut_png, capsys, tmp_path,
                                                monkeypatch):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path))
    code, rows, _ = run(capsys, "scan", "--json", str(t1_jpg), str(astronaut_png))
    if any("not found" in r.get("error", "") for r in rows):
        pytest.skip("models not installed")
    assert code == 0 and [r["decision"] for r in rows] == ["allow", "allow"]


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "consent_guard", "--version"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "consent-guard" in r.stdout


def test_python_dash_m_works_from_any_folder(tmp_path):
    """From a folder that is not the plugin's (issue 13 item 3): the installed package runs,
    and says which home it uses."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, CONSENT_GUARD_HOME=str(tmp_path / "h"))
    probe = subprocess.run([sys.executable, "-c", "import consent_guard"], cwd=tmp_path,
                           capture_output=True, text=True, env=env)
    if probe.returncode:
        pytest.skip("consent_guard is not installed in this Python (pip install -e .)")
    r = subprocess.run([sys.executable, "-m", "consent_guard", "where", "--json"],
                       cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"home": str(tmp_path / "h"), "exists": False,
                                    "reason": "$CONSENT_GUARD_HOME is set", "comfyui": None}
