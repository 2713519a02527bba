"""Registry robustness (issue 12 item 13): two first enrolments at once, a damaged row (listed
and exported without it, matching refuses), and read-only opening (rollback journal, no write
access needed). Embeddings are random unit vectors: no face is involved."""
from __future__ import annotations

import json
import sqlite3
import threading

import numpy as np
import pytest

from consent_guard import cli
from consent_guard.identities import open_admin
from consent_guard.policy import Policy
from consent_guard.registry import (Consent, DamagedRowError, Registry, RegistryError,
                                    RegistryExists, open_for_matching)

PASS = "correct horse battery"


def unit(n, dim=32, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# -- (a) two first enrolments at once ---------------------------------------------------------

@pytest.mark.parametrize("round_", range(6))
def test_two_first_enrolments_at_once_both_succeed(tmp_path, round_):
    db, key = tmp_path / "identities.db", tmp_path / "registry.key"
    start, errors = threading.Barrier(2), []

    def enrol(name, seed):
        try:
            start.wait()
            with open_admin(db, key, PASS) as reg:
                reg.add(name, "any", Consent(name), {"m": unit(2, seed=seed)})
        except Exception as exc:  # the test reports any, IntegrityError included
            errors.append(repr(exc))

    threads = [threading.Thread(target=enrol, args=(f"P{i}", i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with Registry.open(db, key_file=key) as reg:
        assert sorted(i.name for i in reg.identities()) == ["P0", "P1"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".new")]


def test_create_never_replaces_an_existing_registry(tmp_path):
    db = tmp_path / "identities.db"
    with Registry.create(db, PASS) as reg:
        reg.add("A", "any", Consent("A"), {"m": unit(1)})
    with pytest.raises(RegistryExists):
        Registry.create(db, "another passphrase")
    with Registry.open(db, passphrase=PASS) as reg:
        assert [i.name for i in reg.identities()] == ["A"]


def test_same_name_twice_is_refused_inside_the_transaction(tmp_path):
    with Registry.create(tmp_path / "r.db", PASS) as reg:
        reg.add("Same Name", "any", Consent("x"), {"m": unit(1)})
        with pytest.raises(RegistryError, match="already enrolled"):
            reg.add("same name", "any", Consent("x"), {"m": unit(1)})


# -- (b) a damaged row ------------------------------------------------------------------------

@pytest.fixture
def two_people(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    monkeypatch.setenv("CONSENT_GUARD_PASSPHRASE", PASS)
    monkeypatch.setenv("CONSENT_GUARD_EXPORT_PASSPHRASE", "export pass")
    db = home / "identities.db"
    with Registry.create(db, PASS, key_file=home / "registry.key") as reg:
        a = reg.add("Anna Damaged", "any", Consent("Anna"), {"m": unit(2, seed=1)})
        b = reg.add("Ben Fine", "explicit", Consent("Ben"), {"m": unit(2, seed=2)})
    return db, a.id, b.id


def flip_byte_in_file(db, blob: bytes) -> None:
    """Flip one byte in the middle of `blob` where it lies in the file, as disk damage would."""
    raw = bytearray(db.read_bytes())
    at = raw.find(blob)
    assert at > 0 and raw.find(blob, at + 1) == -1
    raw[at + len(blob) // 2] ^= 0x01
    db.write_bytes(bytes(raw))


def sealed_of(db, sql, *args) -> bytes:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchone()[0]
    finally:
        conn.close()


def test_a_flipped_byte_in_an_identity_row(two_people, capsys, tmp_path):
    db, anna, ben = two_people
    flip_byte_in_file(db, sealed_of(db, "SELECT sealed FROM identity WHERE id = ?", anna))
    with Registry.open(db, key_file=db.with_name("registry.key")) as reg:  # key still checks
        with pytest.raises(DamagedRowError, match=f"id '{anna}'"):
            reg.identities()
        assert [i.id for i in reg.identities(skip_damaged=True)] == [ben]
    # list: the readable rows, the damaged one reported, exit 2
    assert cli.main(["identity", "list", "--json"]) == 2
    out = capsys.readouterr()
    assert [json.loads(x)["id"] for x in out.out.splitlines()] == [ben]
    assert f"DAMAGED  identity row 1 (id '{anna}')" in out.err and "skipped by list" in out.err
    # export: written without the damaged row, which is reported; the export imports
    export = tmp_path / "rescue.cgx"
    assert cli.main(["identity", "export", str(export)]) == 2
    assert "skipped by export" in capsys.readouterr().err
    with Registry.create(tmp_path / "new.db", PASS) as fresh:
        assert fresh.import_file(export, "export pass") == (1, 0)
        assert fresh.find(ben).models == {"m": 2}
    # matching fails closed, naming the row
    with pytest.raises(DamagedRowError, match=f"identity row 1 \\(id '{anna}'\\)"):
        open_for_matching(Policy(), db.parent)
    # the admin revokes the damaged row by its id; matching works again
    assert cli.main(["identity", "revoke", anna, "--yes"]) == 0
    open_for_matching(Policy(), db.parent).close()


def test_a_flipped_byte_in_an_embedding_row(two_people, capsys, tmp_path):
    db, anna, ben = two_people
    row_id = sealed_of(db, "SELECT id FROM embedding WHERE identity_id = ? ORDER BY id", anna)
    flip_byte_in_file(db, sealed_of(db, "SELECT sealed FROM embedding WHERE id = ?", row_id))
    with Registry.open(db, key_file=db.with_name("registry.key")) as reg:
        with pytest.raises(DamagedRowError, match=f"embedding row {row_id} \\(identity '{anna}'"):
            reg.embeddings("m")
        assert len(reg.identities()) == 2  # the identity rows themselves are fine
        out = tmp_path / "x.cgx"
        assert reg.export(out, "p") == 2
    with Registry.create(tmp_path / "new.db", PASS) as fresh:
        fresh.import_file(out, "p")
        assert fresh.find(anna).models == {"m": 1}  # the damaged embedding was left out
    with pytest.raises(DamagedRowError, match=f"embedding row {row_id}"):
        open_for_matching(Policy(), db.parent)
    (tmp_path / "imgs").mkdir()
    assert cli.main(["scan", str(tmp_path / "imgs")]) == 2
    assert f"embedding row {row_id}" in capsys.readouterr().err


def test_an_altered_identity_id_orphans_no_embedding_silently(two_people):
    db, anna, _ = two_people
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute("UPDATE identity SET id = ? WHERE id = ?", (anna[:-1] + "x", anna))
    conn.commit()
    conn.close()
    with Registry.open(db, key_file=db.with_name("registry.key")) as reg:
        with pytest.raises(DamagedRowError, match="identity row is missing or its id was"):
            reg.embeddings("m")
        with pytest.raises(DamagedRowError, match="seal does not verify"):
            reg.identities()


def test_a_registry_without_key_check_and_a_damaged_first_row_still_opens(two_people):
    """Registries made before the key check value: one damaged row is not a wrong key."""
    db, anna, ben = two_people
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM meta WHERE key = 'key_check'")
    conn.commit()
    conn.close()
    flip_byte_in_file(db, sealed_of(db, "SELECT sealed FROM identity WHERE id = ?", anna))
    with Registry.open(db, key_file=db.with_name("registry.key")) as reg:
        assert [i.id for i in reg.identities(skip_damaged=True)] == [ben]
    with Registry.open(db, passphrase=PASS) as reg:  # a write puts the check value back
        reg.add("C", "any", Consent("C"), {"m": unit(1, seed=3)})
    assert sealed_of(db, "SELECT value FROM meta WHERE key = 'key_check'")


# -- (c) read-only opening ----------------------------------------------------------------------

def test_readers_open_read_only_and_cannot_write(two_people):
    db, anna, _ = two_people
    reg = open_for_matching(Policy(), db.parent)
    try:
        assert reg.read_only and len(reg.embeddings("m").vectors) == 4
        with pytest.raises(RegistryError, match="read-only"):
            reg.add("X", "any", Consent("X"), {"m": unit(1)})
        with pytest.raises(RegistryError, match="read-only"):
            reg.revoke(anna)
    finally:
        reg.close()


def journal_mode(db, set_to: str = "") -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA journal_mode" + (f" = {set_to}" if set_to else "")) \
            .fetchone()[0]
    finally:
        conn.close()


def test_new_registries_use_a_rollback_journal_and_old_wal_ones_are_switched(tmp_path):
    db = tmp_path / "identities.db"
    Registry.create(db, PASS).close()
    assert journal_mode(db) == "delete"
    assert journal_mode(db, "WAL") == "wal"  # a registry made by an older version
    with Registry.open(db, passphrase=PASS, read_only=True) as reg:  # a reader changes nothing
        assert reg.identities() == []
    assert journal_mode(db) == "wal"
    with Registry.open(db, passphrase=PASS) as reg:  # the admin's next open switches it
        reg.add("A", "any", Consent("A"), {"m": unit(1)})
    assert journal_mode(db) == "delete"


def test_rewriting_the_key_file_keeps_group_read_and_drops_other(tmp_path):
    key = tmp_path / "registry.key"
    with Registry.create(tmp_path / "r.db", PASS, key_file=key) as reg:
        assert oct(key.stat().st_mode & 0o777) == "0o600"  # new: the admin's alone
        key.chmod(0o644)
        reg.write_key_file(key)
        assert oct(key.stat().st_mode & 0o777) == "0o640"
