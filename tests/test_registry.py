"""The identity registry: encryption at rest, keys, revocation, export/import, concurrency and
crash safety. Embeddings here are random unit vectors: no face is involved."""
from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from consent_guard.registry import (Consent, LockedError, Registry, RegistryError,
                                    open_for_matching, registry_paths)
from consent_guard.policy import Policy

PASS = "correct horse battery"


def unit(n, dim=128, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def reg(tmp_path):
    r = Registry.create(tmp_path / "identities.db", PASS, key_file=tmp_path / "registry.key")
    yield r
    r.close()


def test_names_consent_and_embeddings_are_not_stored_in_clear(tmp_path, reg):
    vecs = unit(2)
    reg.add("Ms Zeynep Quartermain", "any", Consent("Zeynep Quartermain", note="signed form 12"),
            {"sface-x": vecs}, aliases=["Zee Q"])
    reg.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("identities"))
    for secret in (b"Quartermain", b"Zee Q", b"signed form", vecs[0].tobytes()[:16]):
        assert secret not in raw
    assert oct((tmp_path / "registry.key").stat().st_mode & 0o777) == "0o600"


def test_open_with_passphrase_or_key_file_and_wrong_keys_fail(tmp_path, reg):
    reg.add("A", "explicit", Consent("A"), {"sface-x": unit(1)})
    db = tmp_path / "identities.db"
    with Registry.open(db, passphrase=PASS) as r:
        assert [i.name for i in r.identities()] == ["A"]
    with Registry.open(db, key_file=tmp_path / "registry.key") as r:
        assert r.identities()[0].consent.by == "A"
    with pytest.raises(LockedError, match="Wrong passphrase"):
        Registry.open(db, passphrase="not it")
    with pytest.raises(LockedError, match="locked"):
        Registry.open(db, key_file=tmp_path / "absent.key")
    other = Registry.create(tmp_path / "other.db", PASS, key_file=tmp_path / "other.key")
    other.close()
    with pytest.raises(LockedError, match="another registry"):
        Registry.open(db, key_file=tmp_path / "other.key")
    with pytest.raises(RegistryError, match="No identity registry"):
        Registry.open(tmp_path / "nope.db", passphrase=PASS)


def test_add_validates_and_find_by_name_alias_or_id(reg):
    with pytest.raises(RegistryError, match="scope"):
        reg.add("A", "sometimes", Consent("A"), {"m": unit(1)})
    with pytest.raises(RegistryError, match="consented"):
        reg.add("A", "any", Consent(" "), {"m": unit(1)})
    with pytest.raises(RegistryError, match="embedding"):
        reg.add("A", "any", Consent("A"), {"m": np.zeros((0, 128), np.float32)})
    a = reg.add("Alice Example", "any", Consent("Alice"), {"m": unit(2)}, aliases=["Ali"])
    with pytest.raises(RegistryError, match="already enrolled"):
        reg.add("alice example", "any", Consent("Alice"), {"m": unit(1)})
    assert reg.find("ali").id == reg.find(a.id).id == reg.find("ALICE EXAMPLE").id
    with pytest.raises(RegistryError, match="No identity named"):
        reg.find("Bob")


def test_embeddings_grouped_per_model_and_generation_counts_writes(reg):
    g0 = reg.generation
    a = reg.add("A", "any", Consent("A"), {"sface-1": unit(3, seed=1), "arcface-2": unit(2, 512)})
    b = reg.add("B", "explicit", Consent("B"), {"sface-1": unit(2, seed=2)})
    assert reg.generation == g0 + 2
    emb = reg.embeddings("sface-1")
    assert emb.vectors.shape == (5, 128)
    assert [emb.identities[o] for o in emb.owners] == [(a.id, "any")] * 3 + [(b.id, "explicit")] * 2
    np.testing.assert_allclose(emb.vectors[:3], unit(3, seed=1))
    assert reg.embeddings("arcface-2").vectors.shape == (2, 512)
    assert reg.embeddings("other").vectors.shape[0] == 0
    assert sorted(reg.model_ids()) == ["arcface-2", "sface-1"]
    assert reg.find("A").models == {"sface-1": 3, "arcface-2": 2}


def test_revoke_deletes_for_good(tmp_path, reg):
    a = reg.add("A", "any", Consent("A"), {"m": unit(4, seed=7)})
    sealed = sqlite3.connect(tmp_path / "identities.db").execute(
        "SELECT sealed FROM embedding").fetchall()
    reg.revoke(a.id)
    assert reg.identities() == [] and reg.embeddings("m").vectors.shape[0] == 0
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("identities"))
    for (blob,) in sealed:  # not even the ciphertext survives in the file or its WAL
        assert blob[:32] not in raw
    with pytest.raises(RegistryError):
        reg.revoke(a.id)


def test_export_import_round_trip_and_replace(tmp_path, reg):
    a = reg.add("A", "any", Consent("A", "B", "2026-01-01", "n"), {"m": unit(2, seed=3)},
                aliases=["Alias-Kept-Secret"])
    out = tmp_path / "school.cgx"
    assert reg.export(out, "export pass") == 1
    assert b"Alias-Kept-Secret" not in out.read_bytes()
    lab = Registry.create(tmp_path / "lab.db", "lab admin pass")
    stale = lab.add("Left school", "any", Consent("x"), {"m": unit(1, seed=9)})
    with pytest.raises(LockedError):
        lab.import_file(out, "wrong")
    assert lab.import_file(out, "export pass") == (1, 0)
    assert {i.name for i in lab.identities()} == {"A", "Left school"}
    got = lab.find(a.id)
    assert got.aliases == ("Alias-Kept-Secret",) and got.consent.on_behalf_of == "B" and got.scope == "any"
    emb = lab.embeddings("m")
    mine = [i for i, _ in emb.identities].index(a.id)
    np.testing.assert_allclose(emb.vectors[emb.owners == mine], unit(2, seed=3))
    assert lab.import_file(out, "export pass", replace=True) == (1, 1)
    assert [i.id for i in lab.identities()] == [a.id]
    assert stale.id not in {i.id for i in lab.identities()}
    lab.close()


def test_registry_location_and_open_for_matching(tmp_path, monkeypatch):
    monkeypatch.delenv("CONSENT_GUARD_PASSPHRASE", raising=False)
    assert open_for_matching(Policy(), tmp_path) is None  # nobody enrolled: no registry
    db, key = registry_paths(Policy(), tmp_path)
    Registry.create(db, PASS).close()  # no key file
    with pytest.raises(LockedError, match="locked"):
        open_for_matching(Policy(), tmp_path)
    monkeypatch.setenv("CONSENT_GUARD_PASSPHRASE", PASS)
    open_for_matching(Policy(), tmp_path).close()
    custom = Policy(registry_path=str(tmp_path / "x" / "r.db"))
    assert registry_paths(custom, tmp_path) == (tmp_path / "x" / "r.db", tmp_path / "x" /
                                                "registry.key")


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from consent_guard.registry import Registry, Consent
    reg = Registry.open(sys.argv[1], passphrase=sys.argv[2])
    for i in range(int(sys.argv[3])):
        v = np.random.default_rng(i).standard_normal((int(sys.argv[4]), 128)).astype("f4")
        reg.add(f"person {sys.argv[5]}-{i}", "any", Consent("x"), {"m": v})
        print(i, flush=True)
""")


def _reader(path, key, n):
    counts = []
    with Registry.open(path, key_file=key) as r:
        for _ in range(n):
            emb = r.embeddings("m")
            ids = {i for i, _ in emb.identities}
            assert len(emb.vectors) == 3 * len(ids)  # never a half-written identity
            counts.append(len(ids))
    return counts


def test_concurrent_writer_and_readers_do_not_corrupt(tmp_path, reg):
    db, key = tmp_path / "identities.db", tmp_path / "registry.key"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(db), PASS, "15", "3", "w"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_reader, [(db, key, 40), (db, key, 40)])
    _, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    for counts in results:
        assert counts == sorted(counts)  # readers only ever see the registry grow
    assert len(reg.identities()) == 15
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_crash_during_enrolment_loses_nothing_stored(tmp_path, reg):
    db = tmp_path / "identities.db"
    reg.add("Kept", "any", Consent("x"), {"m": unit(3)})
    # an enrolment that fails half-way through writing its embeddings rolls back whole
    with pytest.raises(ValueError):
        reg.add("Broken", "any", Consent("x"), {"m": unit(2), "n": np.array([[np.nan, "x"]])})
    assert [i.name for i in reg.identities()] == ["Kept"]
    # a process killed in the middle of a long enrolment: what was committed survives
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(db), PASS, "1000", "200", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(3):
        proc.stdout.readline()
    proc.kill()
    proc.wait()
    with Registry.open(db, passphrase=PASS) as again:
        people = again.identities()
        assert people[0].name == "Kept" and people[0].models == {"m": 3}
        assert all(p.models == {"m": 200} for p in people[1:]) and len(people) >= 4
        emb = again.embeddings("m")
        assert len(emb.vectors) == 3 + 200 * (len(people) - 1)
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert os.path.exists(db)
