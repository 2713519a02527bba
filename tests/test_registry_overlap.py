"""Loading the registry for matching with the rows' digest on a second connection (issue 17,
round four): while the registry's connection checks the identity rows and decrypts the
matrices, a thread hashes each model's rows (registry._RowsCheck); the matrix it decrypted is
kept for the embeddings() that follows. Nothing the digest guarantees is lost: a damaged row is
still caught at load, a thread that read another generation or found the file busy is not
trusted (the rows are then checked on the registry's own connection), and the kept matrix is
handed out once, never for another generation. Embeddings are random unit vectors: no face is
involved."""
from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest

from consent_guard import registry as registry_module
from consent_guard import registry_matrix as matrix
from consent_guard.policy import Policy
from consent_guard.registry import (Consent, DamagedRowError, Registry, _RowsCheck,
                                    open_for_matching)
from test_registry_matrix import PASS, flip_byte_in_file, home, ids, same, sql, unit  # noqa: F401


SPARE_CORE = registry_module._spare_core  # as it is, before the fixture below replaces it


@pytest.fixture(autouse=True)
def every_matrix_checked_aside(monkeypatch):
    """These registries are tiny, and the machine running the tests may be busy: check their
    rows in a thread as a large registry's are with a core free."""
    monkeypatch.setattr(registry_module, "ASIDE_MIN_BYTES", 0)
    monkeypatch.setattr(registry_module, "_spare_core", lambda: True)


def watch_checks(monkeypatch) -> list:
    """(model id, generation asked for, outcome) of every rows' check on the second
    connection, in the order they were waited for."""
    seen = []
    original = _RowsCheck.outcome

    def outcome(self):
        got = original(self)
        seen.append((self.model_id, self.generation, got))
        return got

    monkeypatch.setattr(_RowsCheck, "outcome", outcome)
    return seen


def count_own_digests(monkeypatch) -> list:
    """The models whose rows' digest a registry's own connection computed in this thread (a
    write that a test runs inside a check is in that check's thread)."""
    seen = []
    original = Registry._rows_digest

    def digest(self, model_id, *args):
        if threading.current_thread() is threading.main_thread():
            seen.append(model_id)
        return original(self, model_id, *args)

    monkeypatch.setattr(Registry, "_rows_digest", digest)
    return seen


def count_decryptions(monkeypatch) -> list:
    """The contexts of every sealed matrix opened (decrypted)."""
    seen = []
    original = matrix.open_sealed

    def open_sealed(key, sealed, context):
        seen.append(context)
        return original(key, sealed, context)

    monkeypatch.setattr(matrix, "open_sealed", open_sealed)
    return seen


def generation(home) -> int:
    return int(sql(home, "SELECT value FROM meta WHERE key = 'generation'")[0][0])


def enrol_another(home, seed=9) -> None:
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        reg.add(f"Dana {seed}", "any", Consent("Dana"), {"m": unit(1, seed=seed)})


# -- the digest computed by sqlite in blocks ----------------------------------------------------

def rows_table(rows) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("CREATE TABLE embedding (id INTEGER PRIMARY KEY, identity_id TEXT NOT NULL, "
               "model_id TEXT NOT NULL, created TEXT NOT NULL, sealed BLOB NOT NULL)")
    db.execute("CREATE INDEX embedding_rows ON embedding(model_id)")
    db.executemany("INSERT INTO embedding VALUES (?, ?, ?, '', ?)", rows)
    return db


def odd_rows():
    """Ids out of order, negative and large; identity ids with '/', ',' and non-ASCII text;
    an empty value and values of several lengths; another model's rows in between."""
    rng = np.random.default_rng(3)
    rows = [(i * 7 - 40, f"id_{i % 5}/ü,{i % 3}", "m", rng.bytes(int(rng.integers(0, 90))))
            for i in range(23)]
    rows += [(2 ** 62 + 5, "Ω", "m", b""), (-2 ** 62, "", "m", b"\0" * 9)]
    rows += [(i * 7 - 37, "other", "n", rng.bytes(20)) for i in range(23)]
    return rows


@pytest.mark.parametrize("block", [1, 2, 5, 4096])
def test_the_block_digest_equals_the_row_digest(monkeypatch, block):
    """Blocks of any size (one row, a block boundary on the last row, one block for all) hash
    the very bytes rows_digest hashes: a matrix verified by one verifies by the other."""
    monkeypatch.setattr(matrix, "ROWS_BLOCK", block)
    db = rows_table(odd_rows())
    for model in ("m", "n", "none"):
        want = matrix.rows_digest(db.execute(matrix.ROWS_SQL, (model,)))
        assert want and matrix.rows_digest_by_blocks(db, model) == want


@pytest.mark.parametrize("damage", [
    "UPDATE embedding SET sealed = CAST(sealed AS TEXT) WHERE id = 2",
    "UPDATE embedding SET identity_id = CAST(identity_id AS BLOB) WHERE id = 9",
])
def test_the_block_digest_refuses_a_column_of_the_wrong_type(monkeypatch, damage):
    """A flipped bit in a record header can turn a value into another type of the same bytes:
    rows_digest refuses that (b""), and so must the block digest, although sqlite would join
    the bytes alike."""
    monkeypatch.setattr(matrix, "ROWS_BLOCK", 4)
    db = rows_table([(i, f"id_{i}", "m", bytes([i]) * 5) for i in range(12)])
    db.execute(damage)
    assert matrix.rows_digest(db.execute(matrix.ROWS_SQL, ("m",))) == b""
    assert matrix.rows_digest_by_blocks(db, "m") == b""


def test_the_block_digest_sees_bytes_moved_between_rows():
    a = rows_table([(1, "x", "m", b"abc"), (2, "x", "m", b"def")])
    b = rows_table([(1, "x", "m", b"ab"), (2, "x", "m", b"cdef")])
    assert matrix.rows_digest_by_blocks(a, "m") != matrix.rows_digest_by_blocks(b, "m")


# -- the load ---------------------------------------------------------------------------------

def test_the_rows_are_checked_aside_and_the_matrix_decrypted_once(home, monkeypatch):
    """Each model's rows are hashed on the second connection (the registry's own computes no
    digest), and embeddings() right after the load hands out the matrix the load decrypted."""
    checks = watch_checks(monkeypatch)
    own = count_own_digests(monkeypatch)
    opened = count_decryptions(monkeypatch)
    reg = open_for_matching(Policy(), home)
    try:
        at = generation(home)
        assert sorted(checks) == [("m", at, at), ("n", at, at)] and own == []
        assert len(opened) == 2
        emb = reg.embeddings("m")
        assert len(opened) == 2  # the prefetched matrix, not decrypted again
    finally:
        reg.close()
    with monkeypatch.context() as m:
        m.setattr(Registry, "_matrix_embeddings", lambda self, model: (None, "test"))
        with Registry.open(home / "identities.db", key_file=home / "registry.key") as rows:
            from_rows = rows.embeddings("m")
    assert same(emb, from_rows)


def test_a_damaged_row_is_still_caught_at_load(home, monkeypatch):
    """A flipped byte in one embedding row: the check aside does not verify the rows, the
    registry's connection then hashes them itself, finds them changed, reads them one by one
    and names the row."""
    anna = ids(home)["Anna"]
    row_id, sealed = sql(home, "SELECT id, sealed FROM embedding WHERE identity_id = ? AND "
                               "model_id = 'm' ORDER BY id", anna)[1]
    flip_byte_in_file(home / "identities.db", sealed, at=0.9)
    checks = watch_checks(monkeypatch)
    own = count_own_digests(monkeypatch)
    with pytest.raises(DamagedRowError, match=f"embedding row {row_id} "):
        open_for_matching(Policy(), home)
    assert ("m", generation(home), None) in checks and "m" in own
    assert ("n", generation(home), generation(home)) in checks and "n" not in own


def test_a_row_damaged_after_a_later_write_is_caught_when_the_engine_reloads(home, monkeypatch):
    """The engine reloads the embeddings after an enrolment elsewhere (a new generation): the
    rows are checked aside again while the matrix is decrypted, and a damaged row refuses."""
    reg = open_for_matching(Policy(), home)
    try:
        enrol_another(home)
        row_id, sealed = sql(home, "SELECT id, sealed FROM embedding WHERE model_id = 'm' "
                                   "ORDER BY id")[3]
        flip_byte_in_file(home / "identities.db", sealed, at=0.3)
        checks = watch_checks(monkeypatch)
        with pytest.raises(DamagedRowError, match=f"embedding row {row_id} "):
            reg.embeddings("m")
        assert checks == [("m", generation(home), None)]
    finally:
        reg.close()


def test_an_enrolment_elsewhere_is_loaded_with_the_rows_checked_aside(home, monkeypatch):
    reg = open_for_matching(Policy(), home)
    try:
        enrol_another(home)
        checks = watch_checks(monkeypatch)
        own = count_own_digests(monkeypatch)
        emb = reg.embeddings("m")
        assert checks == [("m", generation(home), generation(home))] and own == []
        assert emb.vectors.shape == (7, 16) and np.allclose(emb.vectors[-1], unit(1, seed=9)[0])
    finally:
        reg.close()


def before_every_check(monkeypatch, first) -> None:
    """Run `first()` once, before any rows' check on the second connection reads the file
    (the checks of all models wait for it)."""
    original, lock, done = _RowsCheck._verify, threading.Lock(), threading.Event()

    def verify(self):
        with lock:
            if not done.is_set():
                try:
                    first()
                finally:
                    done.set()
        return original(self)

    monkeypatch.setattr(_RowsCheck, "_verify", verify)


def test_a_check_that_read_another_generation_is_not_trusted(home, monkeypatch):
    """In a WAL registry (as older versions left them) a writer can commit while the loading
    snapshot is open: the check aside then reads the next generation, whose rows verify
    against the next matrix. That says nothing about this snapshot's rows: they are hashed on
    the registry's own connection instead."""
    keep = sqlite3.connect(home / "identities.db", isolation_level=None)
    assert keep.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
    before = generation(home)
    before_every_check(monkeypatch, lambda: enrol_another(home))  # commits in between
    checks = watch_checks(monkeypatch)
    own = count_own_digests(monkeypatch)
    try:
        reg = open_for_matching(Policy(), home)
        try:
            assert generation(home) == before + 1
            assert sorted(checks) == [("m", before, None), ("n", before, None)]
            assert sorted(own) == ["m", "n"]
            emb = reg.embeddings("m")  # the next generation: its matrix, not the kept one
            assert emb.vectors.shape == (7, 16)
        finally:
            reg.close()
    finally:
        keep.close()


def test_an_outcome_for_another_generation_is_never_trusted(home, monkeypatch):
    """Whatever the thread says, only its verification at this snapshot's generation counts."""
    monkeypatch.setattr(_RowsCheck, "_verify", lambda self: self.generation + 1)
    own = count_own_digests(monkeypatch)
    reg = open_for_matching(Policy(), home)
    reg.close()
    assert sorted(own) == ["m", "n"]


def test_a_busy_file_makes_the_check_aside_give_up_at_once(home, monkeypatch):
    """The rollback journal's trap: the load holds a read lock; a writer that wants to commit
    takes the PENDING lock and waits for it to go; the second connection is then refused a
    read lock, and if it waited out the 30 s busy timeout, so would the load (joining it) and
    the writer. It gives up after ASIDE_BUSY_S instead, the rows are hashed on the registry's
    own connection (which holds its lock already), the load ends, and the writer commits."""
    db = home / "identities.db"
    writer = sqlite3.connect(db, timeout=60, isolation_level=None, check_same_thread=False)
    committing = threading.Thread(target=writer.execute, args=("COMMIT",))

    def writer_waits_to_commit():
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE meta SET value = value || '' WHERE key = 'created'")
        committing.start()
        wait_for_pending(db)

    before_every_check(monkeypatch, writer_waits_to_commit)
    checks = watch_checks(monkeypatch)
    own = count_own_digests(monkeypatch)
    waits = []
    monkeypatch.setattr(registry_module, "_connect", timed_connect(waits))
    try:
        start = time.monotonic()
        reg = open_for_matching(Policy(), home)
        reg.close()
        assert time.monotonic() - start < 15  # not stalled for sqlite's 30 s
        committing.join(30)
        assert not committing.is_alive() and not writer.in_transaction  # it committed
    finally:
        writer.close()
    assert sorted(checks) == [("m", generation(home), None), ("n", generation(home), None)]
    assert sorted(own) == ["m", "n"]
    assert waits and all(w == registry_module.ASIDE_BUSY_S for w in waits)


def timed_connect(timeouts: list):
    """registry._connect, noting the busy timeout of each connection the checks open."""
    original = registry_module._connect

    def connect(path, read_only=False, timeout=30):
        if threading.current_thread() is not threading.main_thread():
            timeouts.append(timeout)
        return original(path, read_only, timeout)

    return connect


def wait_for_pending(db) -> None:
    """Return once a new reader is refused (a writer holds PENDING); fail after 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = sqlite3.connect(db, timeout=0)
        try:
            probe.execute("SELECT count(*) FROM meta").fetchall()
        except sqlite3.OperationalError:
            return
        finally:
            probe.close()
        time.sleep(0.01)
    raise AssertionError("the writer never took the PENDING lock")


def test_the_kept_matrix_is_handed_out_once(home, monkeypatch):
    """The first embeddings() gets the matrix the load decrypted, and the other model's kept
    matrix is dropped then; every later call decrypts afresh."""
    opened = count_decryptions(monkeypatch)
    reg = open_for_matching(Policy(), home)
    try:
        at = generation(home)
        assert set(reg._prefetched) == {("m", at), ("n", at)} and len(opened) == 2
        first = reg.embeddings("m")
        assert reg._prefetched == {} and len(opened) == 2
        second = reg.embeddings("m")
        assert len(opened) == 3 and same(first, second)
        assert first.vectors is not second.vectors
        reg.embeddings("n")
        assert len(opened) == 4
    finally:
        reg.close()


def test_the_kept_matrix_is_not_handed_out_for_another_generation(home, monkeypatch):
    reg = open_for_matching(Policy(), home)
    try:
        at = generation(home)
        kept = reg._prefetched[("m", at)]
        enrol_another(home)
        emb = reg.embeddings("m")
        assert emb.vectors is not kept[3] and emb.vectors.shape == (7, 16)
        assert reg._prefetched == {}
    finally:
        reg.close()


def test_a_damaged_matrix_found_at_load_is_not_kept(home, monkeypatch, caplog):
    sealed = sql(home, "SELECT sealed FROM matrix WHERE model_id = 'm'")[0][0]
    flip_byte_in_file(home / "identities.db", sealed)
    reg = open_for_matching(Policy(), home)
    try:
        assert ("m", generation(home)) not in reg._prefetched
        emb = reg.embeddings("m")  # from the rows, with the log line saying why
        assert emb.vectors.shape == (6, 16)
    finally:
        reg.close()
    assert "sealed matrix that does not verify" in caplog.text


def test_loading_without_blob_reads_uses_the_check_aside_too(home, monkeypatch):
    """Python < 3.11 (no Connection.blobopen): the matrix is read as bytes; the rest is the
    same."""
    monkeypatch.setattr(registry_module, "_BLOB_READS", False)
    checks = watch_checks(monkeypatch)
    opened = count_decryptions(monkeypatch)
    reg = open_for_matching(Policy(), home)
    try:
        emb = reg.embeddings("m")
    finally:
        reg.close()
    at = generation(home)
    assert sorted(checks) == [("m", at, at), ("n", at, at)] and len(opened) == 2
    assert emb.vectors.shape == (6, 16)


def test_a_small_matrix_is_not_checked_aside(home, monkeypatch):
    """Below ASIDE_MIN_BYTES the rows are hashed on the registry's own connection."""
    monkeypatch.setattr(registry_module, "ASIDE_MIN_BYTES", 10 ** 9)
    checks = watch_checks(monkeypatch)
    own = count_own_digests(monkeypatch)
    reg = open_for_matching(Policy(), home)
    reg.close()
    assert checks == [] and sorted(own) == ["m", "n"]


def test_without_a_free_core_the_rows_are_checked_on_the_registry_connection(home,
                                                                             monkeypatch):
    monkeypatch.setattr(registry_module, "_spare_core", lambda: False)
    checks = watch_checks(monkeypatch)
    own = count_own_digests(monkeypatch)
    reg = open_for_matching(Policy(), home)
    try:
        assert checks == [] and sorted(own) == ["m", "n"]
        assert set(reg._prefetched) == {("m", generation(home)), ("n", generation(home))}
    finally:
        reg.close()


@pytest.mark.parametrize("cores, load, free", [(1, 0.0, False), (2, 0.5, True),
                                               (2, 1.9, True), (2, 2.0, False),
                                               (16, 9.0, True)])
def test_a_core_is_free_below_one_runnable_task_per_core(monkeypatch, cores, load, free):
    monkeypatch.setattr(registry_module.os, "sched_getaffinity", lambda pid: set(range(cores)),
                        raising=False)
    monkeypatch.setattr(registry_module.os, "getloadavg", lambda: (load, 0.0, 0.0),
                        raising=False)
    assert SPARE_CORE() is free


def test_a_write_never_checks_rows_aside(home, monkeypatch):
    """Inside a write the rows it changed are visible on its own connection only."""
    started, original = [], _RowsCheck.start

    def start(self):
        started.append(self.model_id)
        original(self)

    monkeypatch.setattr(_RowsCheck, "start", start)
    enrol_another(home)
    assert started == []
    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        reg.embeddings("m")  # outside the write it may
        assert started == ["m"]
