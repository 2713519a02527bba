"""Loading the registry for matching (issue 17, round three): the sealed matrix is decrypted in
chunks straight into aligned, read-only arrays (from an sqlite blob, or from bytes where
sqlite3 has no blob reads), any damage to it is still refused, and the identity list is kept
as columns (the earlier one-object-per-person list is still read). Embeddings are random unit
vectors: no face is involved."""
from __future__ import annotations

import json
import logging
import sqlite3

import numpy as np
import pytest

from consent_guard import registry as registry_module
from consent_guard import registry_matrix as matrix
from consent_guard.policy import Policy
from consent_guard.registry import (Consent, DamagedRowError, Registry, _b64,
                                    open_for_matching, read_key_file, seal, write_export)
from test_registry_matrix import flip_byte_in_file, sql, unit

PASS = "correct horse battery"
KEY = bytes(range(32))
CONTEXT = matrix.context("m", 7, "vectors")


def payload(count=5, dim=4):
    owners = np.array([0] * min(count, 2) + [1] * (count - 2))
    return matrix.pack("m", 7, list(range(3, 3 + count)), unit(count, dim), owners,
                       [("id_a", "any"), ("id_b", "explicit")])


def assert_same(opened, expected):
    header, row_ids, owners, vectors, identities = opened
    assert header == expected[0] and identities == expected[4]
    for got, want in zip((row_ids, owners, vectors), expected[1:4]):
        assert np.array_equal(got, want) and got.dtype == want.dtype


# -- open_sealed ------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [matrix.CHUNK, 7, 16, 1])
def test_open_sealed_equals_unpack_at_any_chunk_size(monkeypatch, chunk):
    """Chunks that split GCM blocks, the header and the arrays anywhere give the same arrays."""
    monkeypatch.setattr(matrix, "CHUNK", chunk)
    plain = payload()
    opened = matrix.open_sealed(KEY, seal(KEY, plain, CONTEXT), CONTEXT)
    assert_same(opened, matrix.unpack(plain))


def test_open_sealed_arrays_are_aligned_and_read_only():
    """Unlike a view into a plain payload (whose header length is arbitrary), the arrays start
    on aligned addresses: numpy's matrix product then needs no copy and no slow path."""
    for count in (1, 2, 3, 5, 8):
        _, row_ids, owners, vectors, _ = matrix.open_sealed(
            KEY, seal(KEY, payload(count, dim=3), CONTEXT), CONTEXT)
        for array in (row_ids, owners, vectors):
            assert array.flags.aligned and not array.flags.writeable
        assert vectors.ctypes.data % 4 == 0 and row_ids.ctypes.data % 8 == 0


def test_open_sealed_reads_an_sqlite_blob():
    if not registry_module._BLOB_READS:
        pytest.skip("this sqlite3 has no Connection.blobopen (Python < 3.11)")
    plain = payload(40, 16)
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (sealed BLOB)")
    db.execute("INSERT INTO t VALUES (?)", (seal(KEY, plain, CONTEXT),))
    with db.blobopen("t", "sealed", 1, readonly=True) as blob:
        opened = matrix.open_sealed(KEY, blob, CONTEXT)
    db.close()
    assert_same(opened, matrix.unpack(plain))


def test_every_flipped_byte_of_a_sealed_matrix_is_refused(monkeypatch):
    """Nonce, header length, header, arrays, tag: a flip anywhere raises NotVerified (never a
    result, never another error), whether it is caught by the header check or the tag."""
    monkeypatch.setattr(matrix, "CHUNK", 64)
    sealed = seal(KEY, payload(3, 2), CONTEXT)
    for at in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[at] ^= 0x01
        with pytest.raises(matrix.NotVerified):
            matrix.open_sealed(KEY, bytes(damaged), CONTEXT)


def test_a_matrix_under_another_context_key_or_cut_short_is_refused():
    sealed = seal(KEY, payload(), CONTEXT)
    for key, value, context in ((KEY, sealed, matrix.context("m", 8, "vectors")),
                                (bytes(32), sealed, CONTEXT),
                                (KEY, sealed[:-1], CONTEXT), (KEY, sealed[:20], CONTEXT),
                                (KEY, b"", CONTEXT)):
        with pytest.raises(matrix.NotVerified):
            matrix.open_sealed(key, value, context)


def test_a_sealed_header_that_overstates_the_rows_is_refused_before_any_allocation():
    """A header is read before the tag is checked, to size the output: a count that does not
    add up to the sealed length must not make it allocate (here: 10**12 rows)."""
    plain = payload()
    size = int.from_bytes(plain[len(matrix.MAGIC):len(matrix.MAGIC) + 4], "little")
    start = len(matrix.MAGIC) + 4
    header = json.loads(plain[start:start + size])
    header["count"] = 10 ** 12
    text = json.dumps(header).encode()
    forged = matrix.MAGIC + len(text).to_bytes(4, "little") + text + plain[start + size:]
    with pytest.raises(matrix.NotVerified, match="header describes"):
        matrix.open_sealed(KEY, seal(KEY, forged, CONTEXT), CONTEXT)


# -- the registry -----------------------------------------------------------------------------

@pytest.fixture
def home(tmp_path):
    """Three people, one model; Cem was imported without a consent record and with aliases."""
    with Registry.create(tmp_path / "identities.db", PASS,
                         key_file=tmp_path / "registry.key") as reg:
        reg.add("Anna", "any", Consent("Anna", "", "2026-01-02", "a note"), {"m": unit(2, seed=1)},
                aliases=["Ann"])
        reg.add("Ben", "explicit", Consent("Ben's father", "Ben"), {"m": unit(3, seed=2)})
        record = {"id": "id_cem", "name": "Cem", "aliases": ["C", "Cemal"], "scope": "any",
                  "created": "2026-01-01T00:00:00Z", "consent": None,
                  "embeddings": {"m": {"dim": 16,
                                       "vectors": _b64(unit(1, seed=3).tobytes())}}}
        write_export(tmp_path / "cem.cgx", "export pass", [record])
        reg.import_file(tmp_path / "cem.cgx", "export pass")
    return tmp_path


def load(home):
    reg = open_for_matching(Policy(), home)
    try:
        return reg.identities(), reg.embeddings("m")
    finally:
        reg.close()


def from_rows(home, monkeypatch):
    """(identities, embeddings) decrypted row by row: the source of truth."""
    with monkeypatch.context() as m:
        m.setattr(Registry, "_matrix_embeddings", lambda self, model: (None, "test"))
        m.setattr(Registry, "_matrix_identities", lambda self: None)
        return load(home)


def matrix_only(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("read the rows one by one")
    monkeypatch.setattr(Registry, "_rows_embeddings", refuse)
    monkeypatch.setattr(Registry, "_decode_identity_rows", refuse)


def same(a, b) -> bool:
    return (np.array_equal(a.vectors, b.vectors) and np.array_equal(a.owners, b.owners)
            and a.identities == b.identities)


@pytest.mark.parametrize("blob_reads", [True, False])
def test_matching_loads_aligned_read_only_vectors_equal_to_the_rows(home, monkeypatch,
                                                                    caplog, blob_reads):
    """With sqlite blob reads (Python 3.11+) and without (the value fetched whole)."""
    if blob_reads and not registry_module._BLOB_READS:
        pytest.skip("this sqlite3 has no Connection.blobopen (Python < 3.11)")
    people, expected = from_rows(home, monkeypatch)
    monkeypatch.setattr(registry_module, "_BLOB_READS", blob_reads)
    matrix_only(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "consent_guard"):
        got_people, got = load(home)
    assert caplog.records == []
    assert same(got, expected) and got_people == people
    assert got.vectors.flags.aligned and not got.vectors.flags.writeable
    assert not got.owners.flags.writeable


def test_the_identity_list_keeps_every_field(home, monkeypatch):
    people, _ = from_rows(home, monkeypatch)
    matrix_only(monkeypatch)
    got, _ = load(home)
    assert got == people
    anna, ben, cem = got
    assert anna.aliases == ("Ann",) and anna.consent == Consent("Anna", "", "2026-01-02",
                                                                "a note")
    assert ben.consent.on_behalf_of == "Ben" and ben.scope == "explicit"
    assert cem.consent is None and cem.aliases == ("C", "Cemal") and cem.models == {"m": 1}
    assert [p.public_dict() for p in got] == [p.public_dict() for p in people]


def test_an_identity_list_written_by_the_earlier_version_is_still_read(home, monkeypatch):
    """Before the columns, the list was one JSON object per person: a registry last written
    by that version still loads its identities from the list, not the rows."""
    people, _ = from_rows(home, monkeypatch)
    key = read_key_file(home / "registry.key")
    ((generation,),) = sql(home, "SELECT generation FROM matrix WHERE model_id = ?",
                           matrix.IDENTITIES)
    old = matrix.MAGIC + json.dumps({"generation": generation,
                                     "identities": [p.public_dict() for p in people]}).encode()
    sql(home, "UPDATE matrix SET sealed = ? WHERE model_id = ?",
        seal(key, old, matrix.context(matrix.IDENTITIES, generation, "vectors")),
        matrix.IDENTITIES)
    matrix_only(monkeypatch)
    assert load(home)[0] == people


def test_a_matrix_value_that_is_not_a_blob_sends_the_reader_to_the_rows(home, monkeypatch,
                                                                       caplog):
    _, expected = from_rows(home, monkeypatch)
    sql(home, "UPDATE matrix SET sealed = 42 WHERE model_id = 'm'")
    with caplog.at_level(logging.WARNING, "consent_guard"):
        _, got = load(home)
    assert same(got, expected) and "does not verify" in caplog.text


def page_size(home) -> int:
    return sql(home, "PRAGMA page_size")[0][0]


def test_a_new_registry_has_large_pages(home):
    assert page_size(home) == registry_module.PAGE_SIZE == 16384


def test_an_older_registry_moves_to_large_pages_at_its_next_vacuum(home, monkeypatch):
    """A registry with sqlite's 4 KB pages (as versions before made) keeps them until a
    revoke vacuums it; then it has the large pages and everything left reads back the same."""
    db = sqlite3.connect(home / "identities.db", isolation_level=None)
    db.execute("PRAGMA page_size = 4096")
    db.execute("VACUUM")
    db.close()
    assert page_size(home) == 4096
    people, _ = from_rows(home, monkeypatch)
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        reg.add("Dee", "any", Consent("Dee"), {"m": unit(1, seed=9)})
        assert page_size(home) == 4096  # an ordinary write does not rewrite the file
        reg.revoke(reg.find("Dee").id)
    assert page_size(home) == 16384
    _, expected = from_rows(home, monkeypatch)
    matrix_only(monkeypatch)
    got_people, got = load(home)
    assert got_people == people and same(got, expected) and len(got.vectors) == 6


def test_model_ids_lists_each_model_with_rows_once(tmp_path):
    with Registry.create(tmp_path / "identities.db", PASS) as reg:
        assert reg.model_ids() == []
        reg.add("Anna", "any", Consent("Anna"), {"m": unit(2), "b": unit(1, 8)})
        reg.add("Ben", "any", Consent("Ben"), {"z": unit(1, 4), "m": unit(3)})
        assert reg.model_ids() == ["b", "m", "z"]
        reg.revoke(reg.find("Anna").id)
        assert reg.model_ids() == ["m", "z"]


# -- the rows' digest -------------------------------------------------------------------------

def stored_digest(home):
    """(generation, the unsealed digest stored with model m's matrix)."""
    generation, sealed = sql(home, "SELECT generation, digest FROM matrix "
                                   "WHERE model_id = 'm'")[0]
    key = read_key_file(home / "registry.key")
    return generation, registry_module.unseal(key, sealed,
                                              matrix.context("m", generation, "digest"))


def test_the_rows_digest_is_taken_in_row_order_through_its_index_without_a_sort(home):
    _, digest = stored_digest(home)
    wanted = matrix.rows_digest(sql(home, matrix.ROWS_SQL, "m"))
    plan = " ".join(r[-1] for r in sql(home, "EXPLAIN QUERY PLAN " + matrix.ROWS_SQL, "m"))
    assert digest == matrix.ROW_ORDER + wanted
    assert "embedding_rows" in plan and "TEMP B-TREE" not in plan


def test_a_digest_an_earlier_version_stored_is_still_checked(home, monkeypatch):
    """Registries last written before the row order keep a 32-byte digest of the rows in
    identity order: their matrix is still used, and a damaged row is still refused."""
    generation, _ = stored_digest(home)
    older = matrix.rows_digest(sql(home, matrix.DIGEST_SQL, "m"))
    sql(home, "UPDATE matrix SET digest = ? WHERE model_id = 'm'",
        seal(read_key_file(home / "registry.key"), older,
             matrix.context("m", generation, "digest")))
    assert len(older) == 32 and stored_digest(home)[1] == older
    _, expected = from_rows(home, monkeypatch)
    with monkeypatch.context() as m:
        matrix_only(m)
        assert same(load(home)[1], expected)
    row_id, sealed = sql(home, "SELECT id, sealed FROM embedding ORDER BY id")[4]
    flip_byte_in_file(home / "identities.db", sealed)
    with pytest.raises(DamagedRowError, match=f"embedding row {row_id} "):
        load(home)
