"""Audit chain anchoring (issue 12 item 11): a MAC per record under a key only the admin and
the ComfyUI account read, and a head file apart from the log. Each attack that passed the bare
hash chain (edit the last line, delete the first lines, edit a line and re-chain, cut the tail)
must now fail `audit --verify`; logs written before the MAC existed stay verifiable with a note.
No models, no images."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from consent_guard import cli
from consent_guard.audit import (AuditLog, head_path_for, key_path_for, line_digest,
                                 sign_record, verify_log)
from consent_guard.verdict import Decision, Reason, Verdict

ALLOW = Verdict(Decision.ALLOW, rule="nothing found")
BLOCK = Verdict(Decision.BLOCK, (Reason("face_match", "id-anna", 0.61, "protected_identity",
                                        Decision.BLOCK),))


def write_log(path: Path, n: int) -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        assert log.record("image", BLOCK if i % 2 else ALLOW, source="cli", note=f"r{i}")
    return log


def raw_lines(path: Path) -> list:
    return path.read_bytes().splitlines()


def put_lines(path: Path, lines: list) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def rechain(lines: list) -> list:
    """What a tamperer without the key does: fix every "prev" after an edit."""
    out = []
    for raw in lines:
        rec = json.loads(raw)
        rec["prev"] = line_digest(out[-1]) if out else None
        out.append(json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode())
    return out


def test_intact_log_verifies_with_no_notes(tmp_path):
    path = tmp_path / "audit.log"
    write_log(path, 5)
    result = verify_log(path)
    assert result.problems == [] and result.notes == []
    head = json.loads(head_path_for(path).read_text())
    assert head["count"] == 5 and head["first"] == 1
    assert head["last"] == line_digest(raw_lines(path)[-1])
    assert oct(key_path_for(path).stat().st_mode & 0o777) == "0o600"


def test_editing_the_last_line_is_detected(tmp_path):
    path = tmp_path / "audit.log"
    write_log(path, 4)
    lines = raw_lines(path)
    lines[-1] = lines[-1].replace(b'"decision":"block"', b'"decision":"allow"')
    put_lines(path, lines)
    problems = verify_log(path).problems
    assert any(p.startswith(f"{path}:4: its MAC does not match") for p in problems)
    assert any("removed from the end, or the last one was replaced" in p for p in problems)


def test_deleting_the_first_lines_is_detected(tmp_path):
    path = tmp_path / "audit.log"
    write_log(path, 5)
    put_lines(path, raw_lines(path)[2:])
    (problem,) = verify_log(path).problems
    assert "oldest record is number 3" in problem and "removed from the start" in problem


def test_editing_a_line_and_rechaining_is_detected(tmp_path):
    path = tmp_path / "audit.log"
    write_log(path, 5)
    lines = raw_lines(path)
    lines[1] = lines[1].replace(b'"decision":"block"', b'"decision":"allow"')
    put_lines(path, rechain(lines))
    problems = verify_log(path).problems
    assert problems and problems[0].startswith(f"{path}:2: its MAC does not match")
    assert not any("'prev'" in p for p in problems)  # the chain itself was made consistent


def test_stripping_the_macs_and_rechaining_is_detected(tmp_path):
    """Making the log look older than anchoring does not help: the head says what was written."""
    path = tmp_path / "audit.log"
    write_log(path, 3)
    stripped = []
    for raw in raw_lines(path):
        rec = json.loads(raw)
        rec.pop("mac"), rec.pop("seq")
        stripped.append(json.dumps(rec, separators=(",", ":")).encode())
    put_lines(path, rechain(stripped))
    problems = verify_log(path).problems
    assert any("holds none of them" in p for p in problems)


def test_cutting_the_tail_or_emptying_the_log_is_detected(tmp_path, monkeypatch, capsys):
    path = tmp_path / "audit.log"
    write_log(path, 5)
    put_lines(path, raw_lines(path)[:3])
    (problem,) = verify_log(path).problems
    assert "ends at record 3" in problem and "says 5" in problem
    path.unlink()
    assert any("holds none of them" in p for p in verify_log(path).problems)
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path))
    assert cli.main(["audit", "--verify"]) == 2
    assert "holds none" in capsys.readouterr().out


def test_deleted_head_is_reported_and_stays_reported_after_new_records(tmp_path):
    path = tmp_path / "audit.log"
    log = write_log(path, 3)
    head_path_for(path).unlink()
    assert any("no head file" in p for p in verify_log(path).problems)
    assert log.record("image", ALLOW, source="cli")  # the writer rebuilds it, marked
    problems = verify_log(path).problems
    assert len(problems) == 1 and "rebuilt at record 4" in problems[0]
    assert json.loads(raw_lines(path)[-1])["seq"] == 4  # numbering went on from the log


def test_a_head_edited_without_the_key_is_detected(tmp_path):
    path = tmp_path / "audit.log"
    write_log(path, 3)
    hp = head_path_for(path)
    head = json.loads(hp.read_text())
    head["count"] = 2
    hp.write_text(json.dumps(head))
    assert any("head is damaged or its MAC does not match" in p
               for p in verify_log(path).problems)


def test_missing_key_fails_closed(tmp_path):
    path = tmp_path / "audit.log"
    write_log(path, 2)
    key_path_for(path).unlink()
    assert any("no audit key" in p for p in verify_log(path).problems)


def test_old_log_stays_verifiable_with_an_unanchored_note(tmp_path, monkeypatch, capsys):
    path = tmp_path / "audit.log"
    old = []
    for i in range(3):  # the format before anchoring: chained, no seq, no mac
        rec = {"time": "2025-01-31T18:04:05.123Z", "kind": "image", "decision": "allow",
               "note": f"old{i}", "prev": line_digest(old[-1]) if old else None}
        old.append(json.dumps(rec, separators=(",", ":")).encode())
    put_lines(path, old)
    write_log(path, 2)
    result = verify_log(path)
    assert result.problems == []
    (note,) = result.notes
    assert f"before {path}:4" in note and f"from {path}:1" in note and "not anchored" in note
    new = json.loads(raw_lines(path)[3])
    assert new["seq"] == 1 and new["prev"] == line_digest(old[-1])
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path))
    assert cli.main(["audit", "--verify"]) == 0
    captured = capsys.readouterr()
    assert "not anchored" in captured.err and "partly unanchored" in captured.out
    # deleting the first anchored record still shows, old lines or not
    lines = raw_lines(path)
    put_lines(path, lines[:3] + lines[4:])
    assert any("removed" in p for p in verify_log(path).problems)


def test_rotation_moves_the_first_record_and_dropping_a_file_shows(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=1500, backups=2)
    for i in range(40):
        assert log.record("image", BLOCK, source="cli", note=f"n{i}")
    assert verify_log(path).problems == []
    head = json.loads(head_path_for(path).read_text())
    assert head["count"] == 40 and head["first"] > 1  # old files were dropped legitimately
    (tmp_path / "audit.log.2").unlink()  # an attacker drops the oldest kept file
    assert any("removed from the start" in p for p in verify_log(path).problems)


def test_whoever_holds_the_key_can_rewrite_everything(tmp_path):
    """The documented limit: the ComfyUI account holds the key (it writes the log), so it can
    re-sign an edited log and its head. This test pins that the README says the truth."""
    from consent_guard.audit import read_key, write_head

    path = tmp_path / "audit.log"
    write_log(path, 3)
    key = read_key(key_path_for(path))
    lines, out = raw_lines(path), []
    for raw in lines:
        rec = json.loads(raw)
        rec.pop("mac")
        rec["decision"] = "allow"
        rec["prev"] = line_digest(out[-1]) if out else None
        out.append(sign_record(key, rec))
    put_lines(path, out)
    write_head(head_path_for(path), key, {"count": 3, "first": 1, "last": line_digest(out[-1]),
                                          "rebuilt_at": None})
    assert verify_log(path).problems == []


def test_mac_is_hmac_sha256_of_the_line_before_it(tmp_path):
    import hmac

    from consent_guard.audit import read_key

    path = tmp_path / "audit.log"
    write_log(path, 1)
    (raw,) = raw_lines(path)
    body, _, tail = raw.rpartition(b',"mac":"')
    mac = hmac.new(read_key(key_path_for(path)), body + b"}", hashlib.sha256).hexdigest()
    assert tail == mac.encode() + b'"}'


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="POSIX permissions (root ignores them)")
def test_unreadable_key_fails_the_record(tmp_path):
    path = tmp_path / "audit.log"
    write_log(path, 1)
    key_path_for(path).chmod(0)
    log = AuditLog(path)
    assert log.record("image", ALLOW, source="cli") is False
    assert "audit.key" in log.last_error
