"""The audit log: record format, prompt modes, no pixels, rotation, the hash chain, failures
that never raise, concurrent writers, and `consent-guard audit`. No models."""
from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from consent_guard import audit, cli
from consent_guard.audit import (AuditLog, audit_for, image_digest, line_digest, log_files,
                                 parse_when, read_records, verify_chain)
from consent_guard.policy import Policy
from consent_guard.verdict import Decision, FaceFinding, Reason, Verdict

REPO = Path(__file__).resolve().parent.parent
KEYS = ["time", "user", "pid", "source", "client_id", "kind", "decision", "categories", "minor",
        "reasons", "identities", "prompt", "negative", "image_sha256", "error", "note", "seq",
        "prev", "mac"]

ALLOW = Verdict(Decision.ALLOW, rule="nothing found")
NUDITY = Verdict(Decision.CENSOR, (Reason("nudenet", "BUTTOCKS_EXPOSED", 0.71234, "nudity",
                                          Decision.CENSOR, (1, 2, 3, 4)),), ((1, 2, 3, 4),))
FACE = Verdict(Decision.BLOCK,
               (Reason("face_match", "id-anna", 0.61, "protected_identity", Decision.BLOCK,
                       (5, 5, 40, 40)),),
               faces=(FaceFinding((5, 5, 40, 40), 0.99, "id-anna", "any", 0.61),
                      FaceFinding((60, 5, 40, 40), 0.98, None),
                      FaceFinding((5, 60, 40, 40), 0.97, "id-ben", "explicit", 0.5)))
PROMPT = Verdict(Decision.BLOCK,
                 (Reason("prompt_lexicon", "schoolgirl", 1.0, "minor_sexual", Decision.BLOCK),
                  Reason("prompt_identity", "id-carl", 1.0, "protected_identity",
                         Decision.BLOCK),
                  Reason("prompt_lexicon", "nude", 1.0, "sexual_explicit", Decision.BLOCK)))


def lines(path: Path) -> list:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]


# -- the record ------------------------------------------------------------------------------

def test_record_fields_in_fixed_order(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    assert log.record("image", NUDITY, source="comfyui", client_id="abc123", prompt="a beach",
                      note="SaveImage") is True
    assert log.healthy and log.last_error is None
    (rec,) = lines(tmp_path / "audit.log")
    assert list(rec) == KEYS
    assert rec["source"] == "comfyui" and rec["client_id"] == "abc123"
    assert rec["kind"] == "image" and rec["decision"] == "censor"
    assert rec["categories"] == ["nudity"] and rec["minor"] is False
    assert rec["reasons"] == [{"check": "nudenet", "label": "BUTTOCKS_EXPOSED",
                               "category": "nudity", "score": 0.7123}]
    assert rec["pid"] == os.getpid() and rec["user"]
    assert rec["note"] == "SaveImage" and rec["error"] is None and rec["prev"] is None
    assert rec["seq"] == 1 and len(rec["mac"]) == 64
    t = dt.datetime.fromisoformat(rec["time"].replace("Z", "+00:00"))
    assert rec["time"].endswith("Z") and len(rec["time"]) == len("2025-01-31T18:04:05.123Z")
    assert abs((dt.datetime.now(dt.timezone.utc) - t).total_seconds()) < 60


def test_each_record_is_one_line_and_chains(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    for _ in range(3):
        assert log.record("prompt", ALLOW, source="cli", prompt="a\nmultiline\nprompt")
    raw = (tmp_path / "audit.log").read_bytes().splitlines()
    assert len(raw) == 3
    assert json.loads(raw[1])["prev"] == hashlib.sha256(raw[0]).hexdigest()
    assert json.loads(raw[2])["prev"] == line_digest(raw[1])
    assert verify_chain(tmp_path / "audit.log") == []


def test_failed_check_is_logged_with_its_error(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    assert log.record("image", Verdict.failed("nudenet model missing"), source="comfyui")
    (rec,) = lines(tmp_path / "audit.log")
    assert rec["decision"] == "block" and rec["error"] == "nudenet model missing"
    assert rec["categories"] == ["error"]


def test_minor_and_identities_from_a_prompt(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    log.record("prompt", PROMPT, source="comfyui", prompt="x")
    (rec,) = lines(tmp_path / "audit.log")
    assert rec["categories"] == ["minor_sexual", "protected_identity", "sexual_explicit"]
    assert rec["minor"] is True
    assert rec["identities"] == ["id-carl"]


def test_identities_from_matched_faces_only_ids(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    log.record("image", FACE, source="comfyui")
    (rec,) = lines(tmp_path / "audit.log")
    assert rec["identities"] == ["id-anna", "id-ben"]  # every matched face; not the unmatched
    text = (tmp_path / "audit.log").read_text()
    assert "bbox" not in text and "region" not in text and "similarity" not in text


@pytest.mark.parametrize("mode", ["hash", "text", "none"])
def test_prompt_modes(tmp_path, mode):
    log = AuditLog(tmp_path / "audit.log", prompt_mode=mode)
    prompt, negative = "ein Porträt, été ☀", "nude, nsfw"
    log.record("prompt", PROMPT, source="cli", prompt=prompt, negative=negative)
    log.record("image", ALLOW, source="cli")  # no prompt given
    rec, rec2 = lines(tmp_path / "audit.log")
    text = (tmp_path / "audit.log").read_text(encoding="utf-8")
    if mode == "hash":
        assert rec["prompt"] == {"sha256": hashlib.sha256(prompt.encode("utf-8")).hexdigest()}
        assert rec["negative"] == {"sha256": hashlib.sha256(negative.encode()).hexdigest()}
        assert prompt not in text and negative not in text
        assert rec2["prompt"] is None and rec2["negative"] is None
    elif mode == "text":
        assert rec["prompt"] == prompt and rec["negative"] == negative
    else:
        assert "prompt" not in rec and "negative" not in rec
        assert list(rec) == [k for k in KEYS if k not in ("prompt", "negative")]
        # the lexicon's matched words are pieces of the prompt: dropped too; ids are kept
        assert [r["label"] for r in rec["reasons"]] == [None, "id-carl", None]
        assert "schoolgirl" not in text


def test_no_pixels_only_a_hash(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    log = AuditLog(tmp_path / "audit.log")
    log.record("image", NUDITY, source="comfyui", image=img)
    data = (tmp_path / "audit.log").read_bytes()
    assert len(data) < 1024
    assert img.tobytes()[:16] not in data and img[0].tobytes() not in data
    for row in img[:4]:
        assert bytes(row.tobytes()[:8]).hex().encode() not in data
    rec = json.loads(data)
    assert rec["image_sha256"] == image_digest(img)
    assert not any(isinstance(v, list) and len(v) > 16 for v in rec.values())


def test_image_digest_covers_shape_and_dtype():
    a = np.zeros((4, 6, 3), np.uint8)
    assert image_digest(a) == image_digest(a.copy())
    assert image_digest(a) != image_digest(a.reshape(6, 4, 3))
    assert image_digest(a) != image_digest(a.astype(np.float32))
    assert image_digest(np.asfortranarray(a)) == image_digest(a)  # C order, any layout
    assert image_digest(np.zeros((1, 0, 3), np.float32))  # empty arrays are fine


def test_given_image_sha256_is_kept(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    log.record("input_image", ALLOW, source="comfyui", image_sha256="ab" * 32)
    assert lines(tmp_path / "audit.log")[0]["image_sha256"] == "ab" * 32


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_file_is_private(tmp_path):
    AuditLog(tmp_path / "sub" / "audit.log").record("image", ALLOW, source="cli")
    assert (tmp_path / "sub" / "audit.log").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "sub" / "audit.log.lock").stat().st_mode & 0o077 == 0


def test_audit_for_policy(tmp_path):
    assert audit_for(Policy(audit_enabled=False), tmp_path) is None
    log = audit_for(Policy(), tmp_path)
    assert log.path == tmp_path / "audit.log" and log.prompt_mode == "hash"
    assert log.max_bytes == 10 * 2 ** 20 and log.backups == 5
    log = audit_for(Policy(audit_path=str(tmp_path / "x.log"), audit_prompt="none",
                           audit_max_mb=0.5, audit_backups=2), tmp_path)
    assert log.path == tmp_path / "x.log" and log.prompt_mode == "none"
    assert log.max_bytes == 2 ** 19 and log.backups == 2


# -- rotation and the chain -------------------------------------------------------------------

def test_rotation_keeps_n_backups_and_the_chain_continues(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=2000, backups=3)
    for i in range(60):
        assert log.record("image", NUDITY, source="cli", note=f"n{i}")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.head", "audit.key", "audit.log", "audit.log.1", "audit.log.2",
                     "audit.log.3", "audit.log.lock"]
    for p in log_files(path):
        assert p.stat().st_size <= 2000
    assert verify_chain(path) == []
    # the first line after rotation chains to the last line of the rotated file
    first = path.read_bytes().splitlines()[0]
    last_rotated = (tmp_path / "audit.log.1").read_bytes().splitlines()[-1]
    assert json.loads(first)["prev"] == line_digest(last_rotated)
    notes = [r["note"] for r in read_records(path)]
    assert notes == [f"n{i}" for i in range(60 - len(notes), 60)]  # oldest first, newest kept
    assert len(notes) < 60  # the oldest were dropped


def test_verify_detects_an_edited_line(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for i in range(5):
        log.record("image", FACE if i == 2 else ALLOW, source="cli")
    raw = path.read_text().splitlines()
    raw[2] = raw[2].replace('"block"', '"allow"')
    path.write_text("\n".join(raw) + "\n")
    problems = verify_chain(path)
    assert len(problems) == 2
    assert problems[0].startswith(f"{path}:3: its MAC does not match")
    assert problems[1].startswith(f"{path}:4: 'prev' does not match") and f"{path}:3" in problems[1]


def test_verify_detects_a_deleted_line_and_junk(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for _ in range(5):
        log.record("image", ALLOW, source="cli")
    raw = path.read_text().splitlines()
    del raw[1]
    path.write_text("\n".join(raw) + "\n")
    assert len(verify_chain(path)) == 1
    with open(path, "a") as f:
        f.write("not json\n")
    problems = verify_chain(path)
    assert len(problems) == 2 and "not a record" in problems[1]
    recs = read_records(path)
    assert len(list(recs)) == 4 and recs.skipped == [(str(path), 5)]


def test_verify_detects_a_deleted_line_across_rotation(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=1500, backups=5)
    for _ in range(12):
        log.record("image", NUDITY, source="cli")
    rotated = tmp_path / "audit.log.1"
    assert rotated.exists() and verify_chain(path) == []
    raw = rotated.read_text().splitlines()
    rotated.write_text("\n".join(raw[:-1]) + "\n")  # drop the rotated file's last line
    problems = verify_chain(path)
    assert len(problems) == 1 and str(path) + ":1" in problems[0]


def test_torn_line_does_not_break_later_records(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record("image", ALLOW, source="cli")
    with open(path, "ab") as f:
        f.write(b'{"time": "2025-')  # a write cut short by someone else
    assert log.record("image", ALLOW, source="cli")
    recs = read_records(path)
    assert len(list(recs)) == 2 and len(recs.skipped) == 1
    problems = verify_chain(path)
    assert len(problems) == 1 and "not a record" in problems[0]


# -- failures never raise ----------------------------------------------------------------------

def test_full_disk_returns_false_and_recovers(tmp_path, monkeypatch, caplog):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    assert log.record("image", ALLOW, source="cli")
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(audit.os, "write", full)
    with caplog.at_level(logging.ERROR, logger="consent_guard"):
        assert log.record("image", FACE, source="cli") is False
        assert log.record("image", FACE, source="cli") is False
    assert not log.healthy and str(path) in log.last_error
    assert "No space left on device" in log.last_error and "disk is full" in log.last_error
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # once
    monkeypatch.setattr(audit.os, "write", real_write)
    assert log.record("image", ALLOW, source="cli") is True
    assert log.healthy and log.last_error is None
    assert len(lines(path)) == 2 and verify_chain(path) == []


def test_short_write_is_taken_back(tmp_path, monkeypatch):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record("image", ALLOW, source="cli")
    real_write = os.write
    monkeypatch.setattr(audit.os, "write", lambda fd, data: real_write(fd, data[:10]))
    assert log.record("image", ALLOW, source="cli") is False and "ENOSPC" in log.last_error
    monkeypatch.setattr(audit.os, "write", real_write)
    assert log.record("image", ALLOW, source="cli")
    assert len(lines(path)) == 2 and verify_chain(path) == []


def test_open_failure_returns_false(tmp_path, monkeypatch):
    log = AuditLog(tmp_path / "audit.log")

    def refuse(*a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "audit.log"))

    monkeypatch.setattr(audit.os, "open", refuse)
    assert log.record("prompt", ALLOW, source="cli", prompt="x") is False
    assert "audit.log" in log.last_error and "EROFS" in log.last_error


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="POSIX permissions (root ignores them)")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        log = AuditLog(folder / "audit.log")
        assert log.record("image", ALLOW, source="cli") is False
        assert str(folder / "audit.log") in log.last_error
        assert "Permission denied" in log.last_error
    finally:
        folder.chmod(0o700)
    assert log.record("image", ALLOW, source="cli") is True and log.healthy


def test_bad_input_never_raises(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    assert log.record("video", ALLOW, source="cli") is False and "kind" in log.last_error
    assert log.record("image", None, source="cli") is False  # type: ignore[arg-type]
    assert log.record("image", ALLOW, source="cli", image=object()) is True
    rec = lines(tmp_path / "audit.log")[-1]
    assert rec["image_sha256"] is None and "image not hashed" in rec["note"]


def test_parent_is_a_file(tmp_path):
    (tmp_path / "home").write_text("a file where the folder should be")
    log = AuditLog(tmp_path / "home" / "audit.log")
    assert log.record("image", ALLOW, source="cli") is False
    assert str(tmp_path / "home" / "audit.log") in log.last_error


# -- concurrency ------------------------------------------------------------------------------

def test_threads_and_instances_keep_one_valid_chain(tmp_path):
    path = tmp_path / "audit.log"
    logs = [AuditLog(path, max_bytes=50_000, backups=50) for _ in range(2)]

    def work(t):
        for i in range(50):
            assert logs[t % 2].record("image", NUDITY, source="cli", note=f"{t}-{i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    notes = [r["note"] for r in read_records(path)]
    assert sorted(notes) == sorted(f"{t}-{i}" for t in range(8) for i in range(50))
    assert len(log_files(path)) > 1  # rotated while racing
    assert verify_chain(path) == []


WRITER = """
import os, sys, time
from consent_guard.audit import AuditLog
from consent_guard.verdict import Decision, Verdict
log = AuditLog(sys.argv[1], max_bytes=40_000, backups=50)
v = Verdict(Decision.ALLOW)
deadline = time.monotonic() + 30
while not os.path.exists(sys.argv[1] + ".go") and time.monotonic() < deadline:
    time.sleep(0.002)  # start together, so the two really race
for i in range(300):
    assert log.record("image", v, source="cli", note=sys.argv[2] + str(i)), log.last_error
"""


@pytest.mark.skipif(os.name != "posix", reason="the POSIX lock; Windows uses msvcrt.locking")
def test_two_processes_keep_one_valid_chain(tmp_path):
    path = tmp_path / "audit.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag], env=env)
             for tag in ("a", "b")]
    time.sleep(0.3)
    Path(str(path) + ".go").touch()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    notes = [r["note"] for r in read_records(path)]
    assert sorted(notes) == sorted(f"{t}{i}" for t in "ab" for i in range(300))
    assert verify_chain(path) == []


# -- reading ------------------------------------------------------------------------------------

def test_parse_when():
    now = dt.datetime(2025, 1, 31, 12, 0, tzinfo=dt.timezone.utc)
    assert parse_when("30m", now) == now - dt.timedelta(minutes=30)
    assert parse_when("12h", now) == now - dt.timedelta(hours=12)
    assert parse_when("7d", now) == now - dt.timedelta(days=7)
    assert parse_when("2025-01-31T10:00Z") == dt.datetime(2025, 1, 31, 10, tzinfo=dt.timezone.utc)
    assert parse_when("2025-01-31").tzinfo is not None
    with pytest.raises(ValueError, match="not a time"):
        parse_when("yesterday")


def test_read_records_filters(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record("image", ALLOW, source="cli")
    log.record("prompt", PROMPT, source="cli", prompt="p")
    log.record("image", FACE, source="cli")
    assert [r["decision"] for r in read_records(path)] == ["allow", "block", "block"]
    assert [r["kind"] for r in read_records(path, decision="block")] == ["prompt", "image"]
    assert len(list(read_records(path, kind="image", decision="block"))) == 1
    assert len(list(read_records(path, since="1h"))) == 3
    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    assert list(read_records(path, since=future)) == []
    assert list(read_records(tmp_path / "missing.log")) == []


# -- the command line ----------------------------------------------------------------------------

@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path))
    return tmp_path


def _old_record(path: Path, hours: float) -> None:
    """Rewrite the newest line's time to `hours` ago (keeping the chain valid after it)."""
    raw = path.read_text().splitlines()
    rec = json.loads(raw[-1])
    rec["time"] = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours)) \
        .isoformat(timespec="milliseconds").replace("+00:00", "Z")
    raw[-1] = json.dumps(rec, ensure_ascii=False, separators=(",", ":"))
    path.write_text("\n".join(raw) + "\n")


def test_cli_lists_filters_and_json(home, capsys):
    path = home / "audit.log"
    log = AuditLog(path)
    log.record("image", NUDITY, source="comfyui")
    _old_record(path, 48)
    log.record("prompt", PROMPT, source="comfyui", prompt="p")
    log.record("image", FACE, source="comfyui")
    assert cli.main(["audit"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    assert "censor" in out[0] and "nudity" in out[0]
    assert "prompt" in out[1] and "identities=id-carl" in out[1] and "minor_sexual" in out[1]
    assert "identities=id-anna,id-ben" in out[2]
    assert cli.main(["audit", "--since", "1d"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert cli.main(["audit", "--decision", "block", "--kind", "image", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line == path.read_text().splitlines()[2]  # as stored
    assert cli.main(["audit", "--since", "yesterday"]) == 2
    assert "not a time" in capsys.readouterr().err


def test_cli_verify_exit_codes(home, capsys):
    path = home / "audit.log"
    log = AuditLog(path)
    for _ in range(3):
        log.record("image", ALLOW, source="cli")
    assert cli.main(["audit", "--verify"]) == 0
    assert "intact" in capsys.readouterr().out
    _old_record(path, 1)  # edits the last line: its MAC and the head show it
    assert cli.main(["audit", "--verify"]) == 2
    assert f"{path}:3: its MAC does not match" in capsys.readouterr().out
    raw = path.read_text().splitlines()
    path.write_text("\n".join(raw[:1] + raw[2:]) + "\n")
    assert cli.main(["audit", "--verify"]) == 2
    captured = capsys.readouterr()
    assert f"{path}:2" in captured.out and "problem" in captured.err


def test_cli_missing_log_and_disabled(home, capsys):
    assert cli.main(["audit"]) == 0
    err = capsys.readouterr().err
    assert str(home / "audit.log") in err and "nothing has been recorded yet" in err
    (home / "policy.toml").write_text("[audit]\nenabled = false\n")
    assert cli.main(["audit", "--verify"]) == 0
    assert "enabled = false" in capsys.readouterr().err


def test_cli_policy_path(home, tmp_path, capsys):
    other = tmp_path / "elsewhere" / "decisions.log"
    pol = tmp_path / "p.toml"
    pol.write_text(f'[audit]\npath = "{other.as_posix()}"\n')
    AuditLog(other).record("image", ALLOW, source="cli")
    assert cli.main(["audit", "--policy", str(pol), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "allow"
