"""The registry's sealed matrix (issue 17): matching reads one sealed copy of a model's vectors
instead of decrypting every row, and nothing the rows guarantee is lost: a damaged matrix or a
damaged row is detected, a stale matrix is never read, revoking removes the person from the
matrix too, read-only readers use it, and registries made before it are read and then migrated.
Embeddings are random unit vectors: no face is involved."""
from __future__ import annotations

import logging
import os
import sqlite3

import numpy as np
import pytest

from consent_guard import registry_matrix
from consent_guard.policy import Policy
from consent_guard.registry import (Consent, DamagedRowError, Registry, RegistryError, _b64,
                                    open_for_matching, read_export, read_key_file, seal,
                                    write_export)

PASS = "correct horse battery"


def unit(n, dim=16, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def home(tmp_path):
    """A registry with three people, two models (16-d "m" for all, 8-d "n" for two)."""
    with Registry.create(tmp_path / "identities.db", PASS,
                         key_file=tmp_path / "registry.key") as reg:
        reg.add("Anna", "any", Consent("Anna"), {"m": unit(2, seed=1), "n": unit(1, 8, 4)})
        reg.add("Ben", "explicit", Consent("Ben"), {"m": unit(3, seed=2)})
        reg.add("Cem", "any", Consent("Cem"), {"m": unit(1, seed=3), "n": unit(2, 8, 5)})
    return tmp_path


def ids(home):
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        return {i.name: i.id for i in reg.identities()}


def sql(home, statement, *args):
    conn = sqlite3.connect(home / "identities.db", isolation_level=None)
    try:
        return conn.execute(statement, args).fetchall()
    finally:
        conn.close()


def with_matrix(home) -> list:
    """The models that have a matrix (the identities' snapshot left out)."""
    return sorted(r[0] for r in sql(home, "SELECT model_id FROM matrix")
                  if r[0] != registry_matrix.IDENTITIES)


def flip_byte_in_file(db, blob: bytes, at: float = 0.5) -> None:
    raw = bytearray(db.read_bytes())
    where = raw.find(blob)
    assert where >= 0 and raw.find(blob, where + 1) == -1
    raw[where + int(len(blob) * at)] ^= 0x01
    db.write_bytes(bytes(raw))


def rows_only(monkeypatch):
    """Make the matrix unusable in this process, so embeddings() reads the rows."""
    monkeypatch.setattr(Registry, "_matrix_embeddings", lambda self, m: (None, "test"))


def no_rows(monkeypatch):
    """Make reading the rows one by one fail: proves the matrix was used."""
    def refuse(self, model_id):
        raise AssertionError("read the rows one by one")
    monkeypatch.setattr(Registry, "_rows_embeddings", refuse)


def load(home, model="m"):
    reg = open_for_matching(Policy(), home)
    try:
        return reg.embeddings(model)
    finally:
        reg.close()


def same(a, b) -> bool:
    return (a.model_id == b.model_id and np.array_equal(a.vectors, b.vectors)
            and np.array_equal(a.owners, b.owners) and a.identities == b.identities)


def test_matching_reads_the_matrix_and_it_equals_the_rows(home, monkeypatch, caplog):
    with monkeypatch.context() as m:
        rows_only(m)
        from_rows = {model: load(home, model) for model in ("m", "n")}
    caplog.clear()
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, "consent_guard"):
        no_rows(m)
        from_matrix = {model: load(home, model) for model in ("m", "n")}
    assert caplog.records == []
    for model in ("m", "n"):
        assert same(from_rows[model], from_matrix[model])
    people = ids(home)
    assert from_matrix["m"].vectors.shape == (6, 16) and from_matrix["n"].vectors.shape == (3, 8)
    assert from_matrix["m"].identities == ((people["Anna"], "any"),
                                           (people["Ben"], "explicit"), (people["Cem"], "any"))
    assert np.allclose(from_matrix["m"].vectors[:2], unit(2, seed=1))


def test_a_flipped_byte_in_the_matrix_is_detected_and_the_rows_are_read(home, caplog):
    sealed = sql(home, "SELECT sealed FROM matrix WHERE model_id = 'm'")[0][0]
    flip_byte_in_file(home / "identities.db", sealed)
    with caplog.at_level(logging.WARNING, "consent_guard"):
        emb = load(home)
    assert "sealed matrix that does not verify" in caplog.text
    assert np.allclose(emb.vectors[2:5], unit(3, seed=2))  # the right vectors, from the rows


def test_a_flipped_byte_in_a_row_refuses_even_with_a_good_matrix(home):
    """The matrix holds an intact copy, but a damaged row must still stop matching: the
    sealed digest of the rows no longer matches, so the rows are read and name it."""
    anna = ids(home)["Anna"]
    row_id, sealed = sql(home, "SELECT id, sealed FROM embedding WHERE identity_id = ? AND "
                               "model_id = 'm' ORDER BY id", anna)[1]
    flip_byte_in_file(home / "identities.db", sealed, at=0.9)
    with pytest.raises(DamagedRowError, match=f"embedding row {row_id} "):
        load(home)


def test_a_row_whose_blob_became_text_is_detected(home):
    """A flipped bit in a record header can turn the sealed blob into text of the same bytes:
    the digest counts wrong column types instead of hashing them alike, and the rows are read
    (which refuses: sqlite cannot even hand that row over)."""
    sql(home, "DROP TRIGGER matrix_stale_update")  # as damage on disk would: no trigger runs
    sql(home, "UPDATE embedding SET sealed = CAST(sealed AS TEXT) WHERE id = 1")
    with pytest.raises(RegistryError, match="cannot be read"):
        load(home)


def test_a_stale_matrix_is_not_read(home, caplog):
    """An older version's change bumps the counter but knows no matrix: it is stale."""
    sql(home, "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    with caplog.at_level(logging.WARNING, "consent_guard"):
        emb = load(home)
    assert "stale sealed matrix" in caplog.text and "rebuilds it" in caplog.text
    assert emb.vectors.shape == (6, 16)


def test_a_matrix_relabelled_as_current_does_not_verify(home, caplog):
    """The generation is part of the seal's additional data: editing the column to make an old
    matrix look current fails its seal."""
    sql(home, "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    sql(home, "UPDATE matrix SET generation = generation + 1")
    with caplog.at_level(logging.WARNING, "consent_guard"):
        emb = load(home)
    assert "does not verify" in caplog.text
    assert emb.vectors.shape == (6, 16)


def test_an_older_versions_insert_drops_the_matrix_and_its_row_is_matched(home, caplog):
    """Any program that writes rows fires the triggers in the file: the matrix is deleted, and
    the reader sees the new row."""
    key = read_key_file(home / "registry.key")
    anna = ids(home)["Anna"]
    row_id = sql(home, "SELECT MAX(id) FROM embedding")[0][0] + 1
    vec = unit(1, seed=9)[0]
    sql(home, "INSERT INTO embedding VALUES (?, ?, 'm', 'x', ?)", row_id, anna,
        seal(key, vec.astype("<f4").tobytes(), f"{anna}/m/{row_id}".encode()))
    sql(home, "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    assert sql(home, "SELECT model_id FROM matrix") == [("n",)]  # and no identities snapshot
    with caplog.at_level(logging.WARNING, "consent_guard"):
        emb = load(home)
    assert "has no sealed matrix" in caplog.text
    assert emb.vectors.shape == (7, 16) and any(np.allclose(v, vec) for v in emb.vectors)


def test_revoke_removes_the_person_from_the_matrix_and_the_file(home, monkeypatch):
    people = ids(home)
    old_matrix = sql(home, "SELECT sealed FROM matrix WHERE model_id = 'm'")[0][0]
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        reg.revoke(people["Ben"])
    no_rows(monkeypatch)
    emb = load(home)
    assert emb.identities == ((people["Anna"], "any"), (people["Cem"], "any"))
    assert emb.vectors.shape == (3, 16)
    assert not any(np.allclose(v, w) for v in emb.vectors for w in unit(3, seed=2))
    raw = (home / "identities.db").read_bytes()
    assert old_matrix[100:164] not in raw  # the old copy, with Ben in it, is gone
    assert not [p for p in home.iterdir() if p.name.startswith("identities.db-")]


def test_revoke_by_an_older_version_wipes_the_matrix_too(home):
    """An older version deletes the rows with secure_delete and vacuums: the trigger deletes
    the matrix holding the person's vectors in the same statement."""
    people = ids(home)
    old_matrix = sql(home, "SELECT sealed FROM matrix WHERE model_id = 'm'")[0][0]
    conn = sqlite3.connect(home / "identities.db", isolation_level=None)
    conn.execute("PRAGMA secure_delete = ON")
    conn.execute("DELETE FROM embedding WHERE identity_id = ?", (people["Ben"],))
    conn.execute("DELETE FROM identity WHERE id = ?", (people["Ben"],))
    conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    conn.execute("VACUUM")
    conn.close()
    assert sql(home, "SELECT COUNT(*) FROM matrix") == [(0,)]
    assert old_matrix[100:164] not in (home / "identities.db").read_bytes()
    assert load(home).identities == ((people["Anna"], "any"), (people["Cem"], "any"))


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_a_read_only_registry_loads_from_the_matrix(home, monkeypatch):
    before = sorted(p.name for p in home.iterdir())
    (home / "identities.db").chmod(0o444)
    home.chmod(0o555)
    try:
        no_rows(monkeypatch)
        reg = open_for_matching(Policy(), home)
        try:
            assert reg.read_only and reg.embeddings("m").vectors.shape == (6, 16)
        finally:
            reg.close()
    finally:
        home.chmod(0o755)
    assert sorted(p.name for p in home.iterdir()) == before  # no -journal, -wal or -shm


def strip_matrix(home) -> None:
    """The registry as a version before the matrix made it: no table, no triggers, no index
    for the rows' digest."""
    for (name,) in sql(home, "SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        sql(home, f"DROP TRIGGER {name}")
    sql(home, "DROP TABLE matrix")
    sql(home, "DROP INDEX embedding_rows")


def test_an_old_format_registry_loads_and_the_next_write_migrates_it(home, monkeypatch,
                                                                      caplog):
    with monkeypatch.context() as m:
        rows_only(m)
        expected = load(home)
    strip_matrix(home)
    with caplog.at_level(logging.WARNING, "consent_guard"):
        assert same(load(home), expected)  # a read-only reader changes nothing
    assert "has no sealed matrix" in caplog.text
    assert sql(home, "SELECT name FROM sqlite_master WHERE name = 'matrix'") == []
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        dee = reg.add("Dee", "explicit", Consent("Dee"), {"m": unit(1, seed=7)})
    assert with_matrix(home) == ["m", "n"]
    assert len(sql(home, "SELECT name FROM sqlite_master WHERE type = 'trigger'")) == \
        sum(s.startswith("CREATE TRIGGER") for s in registry_matrix.SCHEMA) == 6
    assert sql(home, "SELECT name FROM sqlite_master WHERE name = 'embedding_rows'")
    no_rows(monkeypatch)
    emb = load(home)
    assert emb.identities[-1] == (dee.id, "explicit") and emb.vectors.shape == (7, 16)
    assert np.array_equal(emb.vectors[:6], expected.vectors)


def test_a_write_that_finds_a_damaged_row_stores_no_matrix_for_its_model(home):
    """The admin's next change must still work (revoking the damaged person is the fix), and
    matching refuses, naming the row, until then."""
    people = ids(home)
    row_id, sealed = sql(home, "SELECT id, sealed FROM embedding WHERE identity_id = ? AND "
                               "model_id = 'n'", people["Cem"])[0]
    flip_byte_in_file(home / "identities.db", sealed)
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        reg.add("Dee", "any", Consent("Dee"), {"m": unit(1, seed=7)})
    assert with_matrix(home) == ["m"]
    with pytest.raises(DamagedRowError, match=f"embedding row {row_id} "):
        open_for_matching(Policy(), home)
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        reg.revoke(people["Cem"])
    assert with_matrix(home) == ["m", "n"]
    assert load(home, "n").identities == ((people["Anna"], "any"),)


def test_the_identities_come_from_their_sealed_snapshot_and_equal_the_rows(home,
                                                                         monkeypatch):
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        from_rows, damaged = reg._decode_identity_rows()
    assert damaged == [] and [i.name for i in from_rows] == ["Anna", "Ben", "Cem"]
    monkeypatch.setattr(Registry, "_decode_identity_rows",
                        lambda self: pytest.fail("decoded the identity rows one by one"))
    reg = open_for_matching(Policy(), home)
    try:
        assert reg.identities() == from_rows
        assert reg.identities()[0].models == {"m": 2, "n": 1}
    finally:
        reg.close()


def test_a_flipped_byte_in_the_identities_snapshot_is_detected(home, caplog):
    sealed = sql(home, "SELECT sealed FROM matrix WHERE model_id = ?",
                 registry_matrix.IDENTITIES)[0][0]
    flip_byte_in_file(home / "identities.db", sealed)
    reg = open_for_matching(Policy(), home)
    try:
        assert [i.name for i in reg.identities()] == ["Anna", "Ben", "Cem"]  # from the rows
    finally:
        reg.close()
    assert "list of identities that does not verify" in caplog.text


def test_a_changed_scope_is_seen_despite_the_snapshot(home):
    """The scope column is not sealed; the snapshot's digest covers it, so an edit that slips
    past the triggers (damage on disk) sends the reader to the rows."""
    sql(home, "DROP TRIGGER matrix_stale_identity_update")
    sql(home, "UPDATE identity SET scope = 'explicit' WHERE scope = 'any'")
    reg = open_for_matching(Policy(), home)
    try:
        assert {i.scope for i in reg.identities()} == {"explicit"}
    finally:
        reg.close()


def test_export_and_import_are_unchanged_by_the_matrix(home, tmp_path, monkeypatch):
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        assert reg.export(tmp_path / "all.cgx", "export pass") == 3
    fresh = tmp_path / "fresh"
    with Registry.create(fresh / "identities.db", PASS, key_file=fresh / "registry.key") as r:
        assert r.import_file(tmp_path / "all.cgx", "export pass") == (3, 0)
    expected = load(home)
    no_rows(monkeypatch)
    assert same(load(fresh), expected)


def test_rows_digest_changes_with_any_column():
    base = [("id_a", 1, b"\x01\x02"), ("id_b", 2, b"\x03")]
    variants = [[("id_a", 1, b"\x01\x02"), ("id_c", 2, b"\x03")],
                [("id_a", 1, b"\x01\x02"), ("id_b", 3, b"\x03")],
                [("id_a", 1, b"\x01\x03"), ("id_b", 2, b"\x03")],
                [("id_a", 1, b"\x01\x02")]]
    digest = registry_matrix.rows_digest(base)
    assert digest and all(registry_matrix.rows_digest(v) != digest for v in variants)
    assert registry_matrix.rows_digest(list(base)) == digest
    assert registry_matrix.rows_digest([("id_a", 1, "text, not a blob")]) == b""
    assert registry_matrix.rows_digest([(None, 1, b"x")]) == b""


def test_matrix_payload_round_trips():
    vectors, owners = unit(5, 4), np.array([0, 0, 1, 1, 1])
    payload = registry_matrix.pack("m", 7, [3, 4, 5, 6, 9], vectors, owners,
                                   [("id_a", "any"), ("id_b", "explicit")])
    header, row_ids, got_owners, got_vectors, identities = registry_matrix.unpack(payload)
    assert header["generation"] == 7 and list(row_ids) == [3, 4, 5, 6, 9]
    assert np.array_equal(got_owners, owners) and np.array_equal(got_vectors, vectors)
    assert identities == [("id_a", "any"), ("id_b", "explicit")]
    with pytest.raises(registry_matrix.MatrixError):
        registry_matrix.unpack(payload[:-4])


# -- writes update the copies instead of decrypting every row ------------------------------
def count_decryptions(monkeypatch) -> dict:
    """Count the embedding and identity rows decrypted one by one from here on."""
    calls = {"embedding": 0, "identity": 0}
    decode_raw, decode_identity = Registry._decode_raw, Registry._decode_identity

    def raw(self, *args):
        calls["embedding"] += 1
        return decode_raw(self, *args)

    def identity(self, *args):
        calls["identity"] += 1
        return decode_identity(self, *args)
    monkeypatch.setattr(Registry, "_decode_raw", raw)
    monkeypatch.setattr(Registry, "_decode_identity", identity)
    return calls


def from_rows_and_matrix(home, monkeypatch, model="m"):
    """(embeddings read row by row, embeddings read from the matrix alone)."""
    with monkeypatch.context() as m:
        rows_only(m)
        expected = load(home, model)
    with monkeypatch.context() as m:
        no_rows(m)
        return expected, load(home, model)


def test_an_enrolment_decrypts_only_its_own_rows(home, monkeypatch):
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        calls = count_decryptions(monkeypatch)
        dee = reg.add("Dee", "explicit", Consent("Dee"), {"m": unit(2, seed=7)})
        assert calls == {"embedding": 2, "identity": 1}
        monkeypatch.undo()
    expected, got = from_rows_and_matrix(home, monkeypatch)
    assert same(got, expected) and got.identities[-1] == (dee.id, "explicit")
    assert np.allclose(got.vectors[-2:], unit(2, seed=7))
    assert same(*from_rows_and_matrix(home, monkeypatch, "n"))  # the other model kept as is


def test_added_photos_update_the_identity_list_counts_without_decrypting_it(home,
                                                                          monkeypatch):
    anna = ids(home)["Anna"]
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        calls = count_decryptions(monkeypatch)
        reg.add_embeddings(anna, {"n": unit(2, 8, seed=8)})
        assert calls == {"embedding": 2, "identity": 0}
        monkeypatch.undo()
    expected, got = from_rows_and_matrix(home, monkeypatch, "n")  # in Anna's place, not last
    assert same(got, expected) and np.allclose(got.vectors[1:3], unit(2, 8, seed=8))
    monkeypatch.setattr(Registry, "_decode_identity_rows",
                        lambda self, known=None: pytest.fail("decoded the identity rows"))
    reg = open_for_matching(Policy(), home)
    try:
        assert reg.find("Anna").models == {"m": 2, "n": 3}
        assert [i.name for i in reg.identities()] == ["Anna", "Ben", "Cem"]
    finally:
        reg.close()


def test_revoke_updates_the_matrix_without_decrypting_a_row(home, monkeypatch):
    people = ids(home)
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        calls = count_decryptions(monkeypatch)
        reg.revoke(people["Ben"])
        assert calls == {"embedding": 0, "identity": 0}
        monkeypatch.undo()
    expected, got = from_rows_and_matrix(home, monkeypatch)
    assert same(got, expected) and got.vectors.shape == (3, 16)


def test_a_write_after_the_matrix_was_damaged_rebuilds_it_from_every_row(home, monkeypatch):
    """The previous copy is reused only when it verifies; a damaged one is rebuilt whole."""
    sealed = sql(home, "SELECT sealed FROM matrix WHERE model_id = 'm'")[0][0]
    flip_byte_in_file(home / "identities.db", sealed)
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        calls = count_decryptions(monkeypatch)
        reg.add("Dee", "any", Consent("Dee"), {"m": unit(1, seed=7), "n": unit(1, 8, 9)})
        assert calls["embedding"] == 6 + 1 + 1  # every row of m, the new rows of m and n
        monkeypatch.undo()
    expected, got = from_rows_and_matrix(home, monkeypatch)
    assert same(got, expected) and np.allclose(got.vectors[2:5], unit(3, seed=2))


def test_a_write_after_a_row_was_damaged_does_not_trust_the_old_matrix(home, monkeypatch):
    """The matrix still verifies, but the rows no longer hash to its digest: the write reads
    every row, finds the damaged one and stores no matrix for that model."""
    row_id, sealed = sql(home, "SELECT id, sealed FROM embedding WHERE model_id = 'm' "
                               "ORDER BY id")[3]
    flip_byte_in_file(home / "identities.db", sealed, at=0.3)
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        calls = count_decryptions(monkeypatch)
        reg.add("Dee", "any", Consent("Dee"), {"m": unit(1, seed=7)})
        assert calls["embedding"] == 7
        monkeypatch.undo()
    assert with_matrix(home) == ["n"]
    with pytest.raises(DamagedRowError, match=f"embedding row {row_id} "):
        load(home)


def test_an_import_that_reuses_row_ids_stores_the_new_vectors(home, tmp_path, monkeypatch):
    """Importing everyone again deletes and re-inserts every row under the same ids: the
    write's own log of changed rows, not the ids, says what to decrypt."""
    before = sql(home, "SELECT id FROM embedding ORDER BY id")
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        reg.export(tmp_path / "all.cgx", "export pass")
        records = read_export(tmp_path / "all.cgx", "export pass")
        cem = next(r for r in records if r["name"] == "Cem")
        new = unit(1, seed=11)
        cem["embeddings"]["m"]["vectors"] = _b64(new.astype("<f4").tobytes())
        write_export(tmp_path / "changed.cgx", "export pass", records)
        calls = count_decryptions(monkeypatch)
        assert reg.import_file(tmp_path / "changed.cgx", "export pass") == (3, 0)
        assert calls == {"embedding": 9, "identity": 3}
        monkeypatch.undo()
    assert sql(home, "SELECT id FROM embedding ORDER BY id") == before  # the same ids
    expected, got = from_rows_and_matrix(home, monkeypatch)
    assert same(got, expected) and np.allclose(got.vectors[-1], new[0])


def test_a_scope_edited_past_the_triggers_is_matched_with_the_new_scope(home, caplog):
    """The matrix keeps each owner's scope; matching must not use it once the (unsealed) scope
    column says otherwise, even when no trigger ran (damage on disk, a hand edit)."""
    ben = ids(home)["Ben"]
    sql(home, "DROP TRIGGER matrix_stale_identity_update")
    sql(home, "UPDATE identity SET scope = 'any' WHERE id = ?", ben)
    with caplog.at_level(logging.WARNING, "consent_guard"):
        emb = load(home)
    assert (ben, "any") in emb.identities and "scopes differ" in caplog.text


def test_rows_digest_sees_bytes_moved_between_rows():
    """The sealed values are hashed joined: their lengths are hashed too, so moving a byte
    from one row to the next (both rows then damaged) changes the digest."""
    assert registry_matrix.rows_digest([("id_a", 1, b"\x01\x02"), ("id_b", 2, b"\x03")]) != \
        registry_matrix.rows_digest([("id_a", 1, b"\x01"), ("id_b", 2, b"\x02\x03")])
