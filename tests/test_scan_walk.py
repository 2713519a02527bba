"""Folder scan (issue 12 item 12): nothing in a folder is skipped silently. Images are found by
suffix (.jfif, .jpe, .apng included) or by their first bytes (no suffix, a wrong suffix);
symbolic links to folders are followed once (loops end); whatever cannot be checked (a folder
that cannot be listed, a broken link, a pipe) is a result with an error and exit 2. And a
registry that cannot be opened ends the scan with exit 2 and a message, never a traceback.
Benign random images only, detectors are doubles."""
from __future__ import annotations

import json
import os
import sqlite3

import pytest
from PIL import Image

from consent_guard import Engine, cli
from consent_guard.registry import Consent, Registry

from conftest import FakeParts, FakeScorer, keyed_image


@pytest.fixture
def fake_engine(monkeypatch, tmp_path):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cli, "Engine", lambda policy, **kw: Engine(
        policy, parts=FakeParts(), scorer=FakeScorer(whole={20: 0.95}), **kw))


def save(path, key, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(keyed_image(key)).save(path, format=fmt)
    return path


def scan(capsys, *paths):
    code = cli.main(["scan", "--json", *map(str, paths)])
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines() if line.strip()]
    return code, {os.path.relpath(r["path"], paths[0]): r for r in rows}, out.err


def test_images_found_by_suffix_and_by_content(fake_engine, tmp_path, capsys):
    d = tmp_path / "imgs"
    save(d / "a.jfif", 1, "JPEG")
    save(d / "b.jpe", 2, "JPEG")
    save(d / "c.apng", 3)
    save(d / "no_suffix", 20)  # a PNG without a suffix: blocked by the scorer double
    save(d / "renamed.txt", 4, "GIF")
    save(d / "d.webp_backup", 5, "WEBP")
    (d / "notes.txt").write_text("just text, not an image")
    (d / "empty").write_bytes(b"")
    code, rows, _ = scan(capsys, d)
    assert set(rows) == {"a.jfif", "b.jpe", "c.apng", "no_suffix", "renamed.txt",
                         "d.webp_backup"}
    assert rows["no_suffix"]["decision"] == "block" and "error" not in rows["no_suffix"]
    assert code == 1  # flagged, no errors


def test_symlinked_folders_are_followed_once_and_loops_end(fake_engine, tmp_path, capsys):
    d = tmp_path / "imgs"
    save(d / "a.png", 1)
    outside = save(tmp_path / "elsewhere" / "x.png", 20).parent
    os.symlink(outside, d / "linked")
    os.symlink(d, d / "loop")  # imgs/loop -> imgs
    os.symlink(outside, d / "again")  # the same folder twice: checked once
    code, rows, _ = scan(capsys, d)
    assert sorted(rows) == ["a.png", "again/x.png"]
    assert rows["again/x.png"]["decision"] == "block" and code == 1


def test_what_cannot_be_checked_is_an_error_result(fake_engine, tmp_path, capsys):
    d = tmp_path / "imgs"
    save(d / "a.png", 1)
    os.symlink(tmp_path / "gone.png", d / "broken.png")
    os.symlink(tmp_path / "gone_dir", d / "broken_dir")
    os.mkfifo(d / "pipe")
    code, rows, _ = scan(capsys, d)
    assert code == 2
    assert rows["a.png"]["decision"] == "allow"
    assert "broken symbolic link" in rows["broken.png"]["error"]
    assert "broken symbolic link" in rows["broken_dir"]["error"]
    assert "not a regular file" in rows["pipe"]["error"]
    assert all(rows[k]["decision"] == "block" for k in ("broken.png", "broken_dir", "pipe"))


def test_a_folder_that_cannot_be_listed_is_an_error_result(fake_engine, tmp_path, capsys,
                                                           monkeypatch):
    """Root reads every folder, so the denial is simulated here; test_lockdown_users.py has
    the real one under an unprivileged account."""
    d = tmp_path / "imgs"
    save(d / "a.png", 1)
    save(d / "private" / "b.png", 2)
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("private"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(cli.os, "scandir", scandir)
    code, rows, _ = scan(capsys, d)
    assert code == 2 and sorted(rows) == ["a.png", "private"]
    assert "folder cannot be read (Permission denied)" in rows["private"]["error"]


def test_an_unopenable_registry_exits_2_with_a_message(fake_engine, tmp_path, capsys,
                                                        monkeypatch):
    import numpy as np

    from consent_guard import registry

    home = tmp_path / "home"
    with Registry.create(home / "identities.db", "admin pass 1", home / "registry.key") as reg:
        reg.add("A", "any", Consent("A"), {"m": np.eye(1, 8, dtype=np.float32)})
    save(tmp_path / "imgs" / "a.png", 1)

    def refuse(*a, **kw):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(registry.sqlite3, "connect", refuse)
    code = cli.main(["scan", str(tmp_path / "imgs")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(home / "identities.db") in err and "readonly" in err and "lockdown" in err
