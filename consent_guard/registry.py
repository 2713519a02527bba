"""The protected-identity registry: who asked to be protected, and their face embeddings.

One SQLite file. It never holds a photo, only embeddings, and everything personal in it (names,
aliases, consent records, embeddings) is sealed with AES-256-GCM under a random data key. The
data key is stored twice, each copy wrapped: once under a key derived from the admin's
passphrase (scrypt), and optionally once in a key file beside the registry that only the admin
and the account that runs the image generator should be able to read (ComfyUI must read the
registry unattended to protect anyone). Reading needs either; every change needs the passphrase.

Concurrency: a rollback journal (journal_mode DELETE), not WAL: a WAL reader must be able to
create or write "-shm"/"-wal" files beside the registry, so a ComfyUI account that may only read
the folder (see `consent-guard lockdown`) could not open it ("attempt to write a readonly
database"). With DELETE a reader needs read access to the file alone; it waits (busy timeout)
for the few milliseconds a write commits. Registries made by older versions in WAL mode are
switched on the admin's next write (or by `lockdown`). Each change is one transaction, so a
crash in the middle of an enrolment loses nothing already stored. A counter in the meta table
changes with every write, so readers know when to reload. The matching side opens the file
read-only (`read_only=True`, sqlite `mode=ro`), so it works on a registry it cannot write.
Creation is race-free: the new file is built under a temporary name and linked into place only
if no registry appeared meanwhile (two first enrolments at once: one creates, the other opens).

Damaged rows: every identity and embedding row is sealed with AES-GCM, so one flipped byte is
detected. Listing and exporting report such a row and skip it (`identities(skip_damaged=True)`,
`damaged_rows()`); matching fails closed: `embeddings()`, `identities()` and
`open_for_matching` raise DamagedRowError naming the row, because skipping it would silently
leave that person unprotected.
Revoking deletes rows with `secure_delete` on, then vacuums the file.

Matching reads sealed copies (registry_matrix.py): every write also stores, per model, all its
vectors in one sealed matrix, and one sealed list of the identities, each stamped with the new
generation and a sealed digest of the rows it was built from. A write builds them from the
copies it verified at its start plus the rows it touched (only those are decrypted); a copy
that did not verify is rebuilt from every row. A reader uses a copy only when its seal
verifies, its generation is current, the scopes it holds are those of the identity rows and
the rows still hash to its digest (a flipped byte in any row sends it to the rows, which name
the row and refuse); otherwise it reads the rows one by one and logs why. The rows stay the
source of truth: export, import and the damage report work on them, and triggers in the file
drop the copies whenever any program (older versions included) changes a row, so revoking
someone also wipes the copy of their vectors. Registries made before the copies are read row
by row until the admin's next write adds them. A matrix is read from sqlite in pieces and
decrypted straight into the arrays matching uses (registry_matrix.open_sealed); meanwhile a
thread hashes the model's rows on a second read-only connection (that digest is most of a
load). The matrix is used only once they verified; when the thread could not verify them in a
snapshot of the same generation (the file busy, a write between the two snapshots), the
registry's own connection checks them as before. The identity
list is stored as columns; an older version that meets one reads the identity rows instead
(slower, with a log line) until its own next write, and this version still reads the older
one-object-per-person list.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import registry_matrix as matrix

log = logging.getLogger("consent_guard")

REGISTRY_FILENAME = "identities.db"
KEY_FILENAME = "registry.key"
KEY_CHECK = b"consent-guard data key check"
ENV_PASSPHRASE = "CONSENT_GUARD_PASSPHRASE"
SCOPES = ("explicit", "any")
FORMAT = 1
EXPORT_MAGIC = b"CONSENT-GUARD-REGISTRY-EXPORT/1\n"
# scrypt cost: about 0.1 s and 32 MiB per derivation on a laptop; the salt is per registry.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1


class RegistryError(RuntimeError):
    """The registry cannot be used as asked; the message says what to do."""


class LockedError(RegistryError):
    """No key to open the registry (wrong passphrase, or no passphrase and no key file)."""


class RegistryExists(RegistryError):
    """Creating a registry where one already exists (perhaps made a moment ago by another
    process: open it instead)."""


class DamagedRowError(RegistryError):
    """A row of the registry cannot be read (its seal does not verify): matching refuses to go
    on without it. `rows` holds one message per damaged row."""

    def __init__(self, path: Path, rows: List[str]):
        self.rows = rows
        super().__init__(f"The identity registry {path} has {len(rows)} damaged row(s): "
                         + "; ".join(rows[:5]) + (" ..." if len(rows) > 5 else "")
                         + ". Matching stops rather than leave someone unprotected: revoke the "
                           "damaged identity (`consent-guard identity revoke ID`) and enrol "
                           "them again, or import a recent export.")


class _Damaged(Exception):
    """One row that cannot be read; the message names it."""


@dataclass(frozen=True)
class Consent:
    by: str  # who gave consent (the person, a parent, a school officer)
    on_behalf_of: str = ""  # whose behalf, when not their own
    at: str = ""  # ISO time the consent was recorded
    note: str = ""

    def to_dict(self) -> dict:
        return {"by": self.by, "on_behalf_of": self.on_behalf_of, "at": self.at,
                "note": self.note}


@dataclass(frozen=True)
class Identity:
    id: str
    name: str
    scope: str
    aliases: Tuple[str, ...] = ()
    consent: Optional[Consent] = None
    created: str = ""
    models: Dict[str, int] = field(default_factory=dict)  # embedder model_id -> embeddings

    def public_dict(self) -> dict:
        """What `identity list` shows: no biometrics."""
        return {"id": self.id, "name": self.name, "aliases": list(self.aliases),
                "scope": self.scope, "created": self.created,
                "consent": self.consent.to_dict() if self.consent else None,
                "embeddings": dict(self.models)}


@dataclass(frozen=True)
class Embeddings:
    """Every stored embedding of one embedder, ready to match: row i belongs to owners[i]."""

    model_id: str
    vectors: np.ndarray  # (N, dim) float32, unit rows
    owners: np.ndarray  # (N,) index into identities
    identities: Tuple[Tuple[str, str], ...]  # (id, scope) per owner index


_CONSENT_FIELDS = frozenset(("by", "on_behalf_of", "at", "note"))


def _identity_from_dict(p: dict) -> Identity:
    """An Identity from its public_dict() form (the sealed identity list), set field by field
    as the dataclass's own __init__ would, without calling it: for 10,000 people that halves
    the 40 ms the list otherwise adds to every load. KeyError on a missing field."""
    consent = p["consent"]
    if consent:
        if consent.keys() != _CONSENT_FIELDS:
            raise KeyError(f"consent fields {sorted(consent)}")
        consent = _fields(Consent, consent)
    return _fields(Identity, {"id": p["id"], "name": p["name"], "scope": p["scope"],
                              "aliases": tuple(p["aliases"]), "consent": consent or None,
                              "created": p["created"], "models": dict(p["embeddings"])})


_CONSENT_ORDER = tuple(f.name for f in fields(Consent))
_IDENTITY_COLUMNS = ("id", "name", "scope", "aliases", "consent", "created", "models")


def _identity_columns(people: Sequence[Identity]) -> Dict[str, list]:
    """The sealed identity list's form (registry_matrix.pack_identities): one list per field,
    a consent as its values in field order (or None)."""
    return {"id": [p.id for p in people], "name": [p.name for p in people],
            "scope": [p.scope for p in people], "aliases": [list(p.aliases) for p in people],
            "consent": [[getattr(p.consent, f) for f in _CONSENT_ORDER] if p.consent else None
                        for p in people],
            "created": [p.created for p in people], "models": [dict(p.models) for p in people]}


def _identities_from_columns(columns: Dict[str, list]) -> List[Identity]:
    """The Identity objects of _identity_columns' form, built as _fields does (see
    registry_matrix.pack_identities for the time it saves). KeyError/ValueError when a column
    is missing or of another length, or a consent has other fields."""
    values = [columns[name] for name in _IDENTITY_COLUMNS]
    if any(len(v) != len(values[0]) for v in values):
        raise ValueError("identity list columns of different lengths")
    new, out = object.__new__, []
    for ident, name, scope, aliases, consent, created, models in zip(*values):
        if consent is not None:
            if len(consent) != len(_CONSENT_ORDER):
                raise ValueError(f"a consent of {len(consent)} fields")
            given, consent = consent, new(Consent)
            consent.__dict__.update(zip(_CONSENT_ORDER, given))
        person = new(Identity)
        person.__dict__.update(id=ident, name=name, scope=scope, aliases=tuple(aliases),
                               consent=consent, created=created, models=models)
        out.append(person)
    return out


def _with_models(ident: Identity, models: Dict[str, int]) -> Identity:
    """dataclasses.replace(ident, models=models), at a fifth of the cost (see above)."""
    return _fields(Identity, {**ident.__dict__, "models": models})


def _fields(cls, values: dict):
    obj = object.__new__(cls)
    obj.__dict__.update(values)  # a frozen dataclass blocks setattr, not its __dict__
    return obj


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _aead():
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:  # pragma: no cover - requirements.txt installs it
        raise RegistryError("The identity registry needs the `cryptography` package: run "
                            "install.py or `pip install cryptography`.") from exc
    return AESGCM


def derive_key(passphrase: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R,
               p: int = SCRYPT_P) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    if not passphrase:
        raise RegistryError("The passphrase is empty.")
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def seal(key: bytes, plain: bytes, context: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + _aead()(key).encrypt(nonce, plain, context)


def unseal(key: bytes, sealed: bytes, context: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        return _aead()(key).decrypt(sealed[:12], sealed[12:], context)
    except InvalidTag:
        raise LockedError("wrong key: the data cannot be decrypted with it") from None


def read_passphrase_file(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"Cannot read the passphrase file {path}: {exc}") from None
    return text.rstrip("\r\n")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identity (
    id TEXT PRIMARY KEY, scope TEXT NOT NULL, created TEXT NOT NULL, sealed BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS embedding (
    id INTEGER PRIMARY KEY, identity_id TEXT NOT NULL REFERENCES identity(id) ON DELETE CASCADE,
    model_id TEXT NOT NULL, created TEXT NOT NULL, sealed BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS embedding_model ON embedding(model_id, identity_id);
"""


# sqlite page size of new registries (and of older ones at their next VACUUM, after a revoke).
# Not sqlite's 4096: loading reads all of a model's rows (for their digest) and its matrix,
# 50-200 MB at 100,000 embeddings, and with 16 KB pages that is a quarter of the page reads;
# a load of 100,000 x 128-d took 0.55 s against 0.63 s (this machine, others running). Any
# sqlite, older Consent Guard versions included, reads either.
PAGE_SIZE = 16384

# sqlite3 reads a value in pieces (Connection.blobopen) from Python 3.11 on.
_BLOB_READS = hasattr(sqlite3.Connection, "blobopen")

_MODEL_IDS = ("WITH RECURSIVE m(id) AS (SELECT min(model_id) FROM embedding UNION ALL "
              "SELECT (SELECT min(model_id) FROM embedding WHERE model_id > m.id) FROM m "
              "WHERE m.id IS NOT NULL) SELECT id FROM m WHERE id IS NOT NULL")

# Where a matrix is (_matrix_row's column): its rowid, to open it as a blob, and its sealed
# length (from the record header: the value is not read).
_MATRIX_PLACE = "m.rowid, length(m.sealed)"

# The rows of one model, grouped by identity in enrolment order: what the matrix holds.
_ROWS_OF_MODEL = ("FROM embedding e LEFT JOIN identity i ON i.id = e.identity_id "
                  "WHERE e.model_id = ? ORDER BY i.rowid, e.identity_id, e.id")


class Registry:
    """An open registry file. Thread-safe; one connection per instance, guarded by a lock."""

    def __init__(self, path: Path, key: bytes, read_only: bool = False):
        self.path = Path(path)
        self._key = key
        self.read_only = read_only
        self._cipher = _aead()(key)  # one AES-GCM object: building one per row cost 3 us each
        from cryptography.exceptions import InvalidTag

        self._invalid_tag = InvalidTag  # looked up once, not once per row
        self._lock = threading.RLock()
        self._db = _connect(self.path, read_only=read_only)
        self._verified: Dict[str, int] = {}  # model_id -> generation its rows were checked at
        self._identities_at: Optional[tuple] = None  # (generation, identities, damaged)
        self._writing = False
        self._previous: Dict[str, object] = {}  # during a write: _trusted_copies()
        # (model id, generation) -> open_sealed of a matrix decrypted by check_for_matching
        # after its rows verified: handed out once, by the next embeddings() (see _open_matrix)
        self._prefetched: Dict[Tuple[str, int], tuple] = {}

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, passphrase: str, key_file: Optional[Path] = None) -> "Registry":
        """A new, empty registry. `key_file` (if given) receives the data key, mode 0600.
        Raises RegistryExists when a registry is there already, even one that another process
        created a moment ago: the file is built under a temporary name and linked into place,
        which fails instead of overwriting."""
        path = Path(path)
        if path.exists():
            raise RegistryExists(f"A registry already exists at {path}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        data_key = secrets.token_bytes(32)
        salt = secrets.token_bytes(16)
        kek = derive_key(passphrase, salt)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.new")
        try:
            db = _connect(tmp)
            db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # before the first table
            with db:
                db.executescript(_SCHEMA + ";\n".join(matrix.SCHEMA) + ";")
                meta = {"format": str(FORMAT), "generation": "0",
                        "kdf": json.dumps({"salt": _b64(salt), "n": SCRYPT_N, "r": SCRYPT_R,
                                           "p": SCRYPT_P}),
                        "wrapped_key": _b64(seal(kek, data_key, b"data key")),
                        "key_check": _b64(seal(data_key, KEY_CHECK, b"key check")),
                        "created": _now()}
                db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            db.close()
            _restrict(tmp)
            _claim(tmp, path)
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
                try:
                    leftover.unlink()
                except OSError:
                    pass
        if key_file is not None:
            write_key_file(Path(key_file), data_key)
        return cls(path, data_key)

    @classmethod
    def open(cls, path: Path, *, passphrase: Optional[str] = None,
             key_file: Optional[Path] = None, read_only: bool = False) -> "Registry":
        """Open with the passphrase if given, else with the key file. `read_only`: never
        write (sqlite mode=ro), so an account that may only read the file can match."""
        path = Path(path)
        if not path.is_file():
            raise RegistryError(f"No identity registry at {path}. Create one with "
                                f"`consent-guard identity init`.")
        db = _connect(path, read_only=read_only)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise RegistryError(_explain(path, exc, "is not a readable Consent Guard registry"))\
                from None
        finally:
            db.close()
        if int(meta.get("format", 0)) != FORMAT:
            raise RegistryError(f"{path} has registry format {meta.get('format')}; this "
                                f"Consent Guard reads format {FORMAT}.")
        if passphrase is not None:
            kdf = json.loads(meta["kdf"])
            kek = derive_key(passphrase, _unb64(kdf["salt"]), kdf["n"], kdf["r"], kdf["p"])
            try:
                data_key = unseal(kek, _unb64(meta["wrapped_key"]), b"data key")
            except LockedError:
                raise LockedError(f"Wrong passphrase for the registry {path}.") from None
        elif key_file is not None and Path(key_file).is_file():
            data_key = read_key_file(Path(key_file))
        else:
            where = f" (no key file at {key_file})" if key_file else ""
            raise LockedError(
                f"The registry {path} is locked{where}: give the admin passphrase "
                f"(${ENV_PASSPHRASE} or --passphrase-file), or create the key file with "
                f"`consent-guard identity key-file`.")
        reg = cls(path, data_key, read_only=read_only)
        try:
            reg._check_key()
        except BaseException:
            reg.close()
            raise
        return reg

    def _check_key(self) -> None:
        """The key opens this registry: the sealed check value in meta says so; registries
        made before it existed are tried on their rows (any one that opens will do, so one
        damaged row is not taken for a wrong key)."""
        with self._lock:
            check = self._meta("key_check")
            if check:
                rows = [(_unb64(check), b"key check")]
            else:
                rows = [(r[1], r[0].encode()) for r in self._db.execute(
                    "SELECT id, sealed FROM identity ORDER BY rowid LIMIT 50")]
                rows += [(r[3], f"{r[0]}/{r[1]}/{r[2]}".encode()) for r in self._db.execute(
                    "SELECT identity_id, model_id, id, sealed FROM embedding LIMIT 50")]
        if not rows:
            return
        for sealed, context in rows:
            try:
                self._unseal(sealed, context)
                return
            except LockedError:
                continue
        raise LockedError(f"The key file does not open the registry {self.path}: it "
                          f"belongs to another registry. Recreate it with "
                          f"`consent-guard identity key-file`.")

    def verify_passphrase(self, passphrase: str) -> None:
        """Raise LockedError unless `passphrase` is the admin passphrase of this registry."""
        kdf = json.loads(self._meta("kdf"))
        kek = derive_key(passphrase, _unb64(kdf["salt"]), kdf["n"], kdf["r"], kdf["p"])
        try:
            if unseal(kek, _unb64(self._meta("wrapped_key")), b"data key") != self._key:
                raise LockedError("the passphrase opens another key")
        except LockedError:
            raise LockedError(f"Wrong admin passphrase for the registry {self.path}.") from None

    def change_passphrase(self, new: str) -> None:
        """Wrap the data key under `new` instead of the old passphrase (the registry must be
        open with a key, not read-only). Only the meta rows "kdf" and "wrapped_key" change, in
        one transaction: the format, the key file and every sealed row stay as they were."""
        salt = secrets.token_bytes(16)
        kek = derive_key(new, salt)
        kdf = json.dumps({"salt": _b64(salt), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P})
        with self._write() as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'kdf'", (kdf,))
            db.execute("UPDATE meta SET value = ? WHERE key = 'wrapped_key'",
                       (_b64(seal(kek, self._key, b"data key")),))

    def close(self) -> None:
        with self._lock:
            self._prefetched = {}
            self._db.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sealing with the data key ---------------------------------------------------------
    def _seal(self, plain: bytes, context: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._cipher.encrypt(nonce, plain, context)

    def _unseal(self, sealed: bytes, context: bytes) -> bytes:
        """As `unseal`, with this registry's key (LockedError when the seal does not verify)."""
        try:
            # a memoryview, not sealed[12:]: slicing would copy a 50-200 MB matrix first
            return self._cipher.decrypt(sealed[:12], memoryview(sealed)[12:], context)
        except self._invalid_tag:
            raise LockedError("wrong key: the data cannot be decrypted with it") from None

    # -- reading -------------------------------------------------------------------------
    def _meta(self, key: str) -> str:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else ""

    @property
    def generation(self) -> int:
        """Changes with every write, from any process: readers reload when it does."""
        with self._lock:
            return int(self._meta("generation") or 0)

    def _query(self, sql: str, args: tuple = ()) -> list:
        """Rows of one query; sqlite's own errors (a damaged file, no permission) become a
        RegistryError that names the file."""
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise RegistryError(_explain(self.path, exc, "cannot be read")) from None

    def _identity_rows(self) -> Tuple[List[Identity], List[str]]:
        """(identities that read back, one message per damaged identity row). Decoded once per
        generation: the matcher asks at start for the check, the face backend and the prompt
        names, and 10,000 people cost 0.1-0.3 s a time. Never cached during a write, which
        changes the rows before it changes the generation."""
        with self._lock, self._snapshot():
            if self._writing:
                return self._identities_in_write()
            generation = self.generation
            if self._identities_at is None or self._identities_at[0] != generation:
                people = self._matrix_identities()
                self._identities_at = (generation, people, []) if people is not None else \
                    (generation, *self._decode_identity_rows())
            _, out, damaged = self._identities_at
            return list(out), list(damaged)

    def _identities_in_write(self) -> Tuple[List[Identity], List[str]]:
        """The identity rows as a write sees them: the list verified at its start while the
        stored snapshot is still there (the triggers delete it as soon as this write changes
        an identity or embedding row), else decoded from the rows."""
        known = self._previous.get(matrix.IDENTITIES)
        if known is not None and self._query("SELECT 1 FROM matrix WHERE model_id = ?",
                                             (matrix.IDENTITIES,)):
            return list(known.values()), []
        return self._decode_identity_rows()

    def _matrix_identities(self) -> Optional[List[Identity]]:
        """Everyone enrolled, from the sealed snapshot kept with the matrices (one decryption
        instead of one per person), when it is current and the identity rows are byte for
        byte those it was built from; else None (the rows are then decoded one by one)."""
        found = self._matrix_row(matrix.IDENTITIES, "m.sealed")
        if found is None or found[0] != found[-1]:
            return None
        generation, digest, sealed, _ = found
        try:
            wanted = self._unseal(digest, matrix.context(matrix.IDENTITIES, generation, "digest"))
            if self._identity_digest() != wanted:
                return None
            built_at, people = matrix.unpack_identities(
                self._unseal(sealed, matrix.context(matrix.IDENTITIES, generation, "vectors")))
            if built_at != generation:
                return None
            if isinstance(people, dict):
                return _identities_from_columns(people)
            return [_identity_from_dict(p) for p in people]  # written by an earlier version
        except (LockedError, TypeError, ValueError, KeyError):
            log.warning("Consent Guard: the identity registry %s has a sealed list of "
                        "identities that does not verify (damaged or altered): reading them "
                        "one by one. The admin's next change rebuilds it.", self.path)
            return None

    def _identity_digest(self) -> bytes:
        with self._lock:
            try:
                return matrix.rows_digest(self._db.execute(matrix.IDENTITY_DIGEST_SQL))
            except sqlite3.DatabaseError:
                return b""

    def _decode_identity_rows(self, known: Optional[Dict[str, Identity]] = None
                              ) -> Tuple[List[Identity], List[str]]:
        """(identities, one message per damaged row), decrypting each row, except those in
        `known` (id -> Identity verified unchanged, as a write's previous list less the rows
        it touched): only their embedding counts are taken afresh."""
        known = known or {}
        rows = self._query("SELECT rowid, id, scope, created, sealed FROM identity "
                           "ORDER BY rowid")
        counts: Dict[str, Dict[str, int]] = {}
        for ident, model, n in self._query("SELECT identity_id, model_id, COUNT(*) FROM "
                                           "embedding GROUP BY model_id, identity_id"):
            counts.setdefault(ident, {})[model] = n
        out, damaged = [], []
        for rowid, ident, scope, created, sealed in rows:
            hit = known.get(ident)
            if hit is not None and hit.scope == scope and hit.created == created:
                out.append(_with_models(hit, counts.get(ident, {})))
                continue
            try:
                out.append(self._decode_identity(rowid, ident, scope, created, sealed,
                                                 counts.get(ident, {})))
            except _Damaged as exc:
                damaged.append(str(exc))
        return out, damaged

    def _decode_identity(self, rowid, ident, scope, created, sealed, models) -> Identity:
        where = f"identity row {rowid} (id {ident!r})"
        if not isinstance(ident, str) or not isinstance(sealed, bytes):
            raise _Damaged(f"{where}: wrong column types")
        if scope not in SCOPES:
            raise _Damaged(f"{where}: unknown scope {scope!r}")
        try:
            info = json.loads(self._unseal(sealed, ident.encode()).decode("utf-8"))
            consent = Consent(**info["consent"]) if info.get("consent") else None
            return Identity(ident, info["name"], scope, tuple(info.get("aliases", ())),
                            consent, str(created), models)
        except LockedError:
            raise _Damaged(f"{where}: its seal does not verify (damaged or altered)") from None
        except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError included
            raise _Damaged(f"{where}: unreadable content ({exc})") from None

    def identities(self, skip_damaged: bool = False) -> List[Identity]:
        """Everyone enrolled. A damaged row raises DamagedRowError (a checker must not run
        without it), unless `skip_damaged`: then it is left out (`damaged_rows()` names it)."""
        out, damaged = self._identity_rows()
        if damaged and not skip_damaged:
            raise DamagedRowError(self.path, damaged)
        return out

    def damaged_rows(self) -> List[str]:
        """One message per identity or embedding row that cannot be read back: what `list` and
        `export` report and skip, and what makes matching refuse to run."""
        _, damaged = self._identity_rows()
        rows = self._query("SELECT e.id, e.identity_id, e.model_id, e.sealed, i.scope FROM "
                           "embedding e LEFT JOIN identity i ON i.id = e.identity_id "
                           "ORDER BY e.id")
        for row_id, ident, model_id, sealed, scope in rows:
            try:
                self._decode_vector(row_id, ident, model_id, sealed, scope)
            except _Damaged as exc:
                damaged.append(str(exc))
        return damaged

    def check_rows(self) -> None:
        """Raise DamagedRowError when any row cannot be read back (see damaged_rows)."""
        damaged = self.damaged_rows()
        if damaged:
            raise DamagedRowError(self.path, damaged)

    def _decode_vector(self, row_id, ident, model_id, sealed, scope) -> np.ndarray:
        return np.frombuffer(self._decode_raw(row_id, ident, model_id, sealed, scope), "<f4")

    def _decode_raw(self, row_id, ident, model_id, sealed, scope) -> bytes:
        """The float32 bytes of one embedding row (no array: the caller joins many at once)."""
        where = f"embedding row {row_id} (identity {ident!r}, model {model_id!r})"
        if scope is None:
            raise _Damaged(f"{where}: its identity row is missing or its id was altered")
        if scope not in SCOPES:
            raise _Damaged(f"{where}: its identity has an unknown scope {scope!r}")
        try:
            raw = self._unseal(sealed, f"{ident}/{model_id}/{row_id}".encode())
        except (LockedError, TypeError):
            raise _Damaged(f"{where}: its seal does not verify (damaged or altered)") from None
        if not raw or len(raw) % 4:
            raise _Damaged(f"{where}: not a vector ({len(raw)} bytes)")
        return raw

    def find(self, name_or_id: str) -> Identity:
        """An identity by id, display name or alias (case-insensitive); damaged rows are not
        searched (revoke one by its id)."""
        wanted = name_or_id.casefold()
        hits = [i for i in self.identities(skip_damaged=True)
                if i.id == name_or_id or i.name.casefold() == wanted
                or wanted in (a.casefold() for a in i.aliases)]
        if not hits:
            raise RegistryError(f"No identity named '{name_or_id}' in {self.path} "
                                f"(`consent-guard identity list` shows them).")
        if len(hits) > 1:
            raise RegistryError(f"'{name_or_id}' names {len(hits)} identities; use the id: "
                                + ", ".join(i.id for i in hits))
        return hits[0]

    def model_ids(self) -> List[str]:
        """The embedder model ids that have rows, in order. One index seek per model (a
        skip-scan of embedding_model), not DISTINCT's walk of every index entry: 6 ms at
        100,000 rows, and a load asks twice."""
        return [r[0] for r in self._query(_MODEL_IDS)]

    def embeddings(self, model_id: str) -> Embeddings:
        """All embeddings made by `model_id`, grouped by identity (rows of one owner adjacent).
        Read from the model's sealed matrix when it is current and the rows are unchanged (see
        registry_matrix.py), else row by row, with a log line saying why. Raises
        DamagedRowError naming any row that cannot be read back: matching without it would
        leave that person unprotected. The arrays are read-only (and, from the matrix,
        aligned, so the matching product needs no copy)."""
        with self._lock, self._snapshot():
            emb, why = self._matrix_embeddings(model_id)
            if emb is not None:
                return emb
            emb, _, damaged = self._rows_embeddings(model_id)
        if damaged:
            raise DamagedRowError(self.path, damaged)
        if len(emb.vectors):
            log.warning("Consent Guard: the identity registry %s %s: matching reads its %d "
                        "embeddings of %s one by one (slower). The admin's next change to the "
                        "registry (any `consent-guard identity` change) rebuilds it.",
                        self.path, why, len(emb.vectors), model_id)
        return emb

    def check_for_matching(self) -> None:
        """What the matcher checks when it opens the registry: every identity row, and every
        embedding row of every model: through the sealed digest of the rows when the model's
        matrix is current (the rows are read but not decrypted), else one by one. Raises
        DamagedRowError naming every damaged row.

        The rows' digest is most of a load (sqlite handing 54 MB over at 100,000 x 128-d), so
        it runs on a second connection in a thread (_RowsCheck) while this one checks the
        identity rows and decrypts the current matrices; a matrix whose rows verified is kept
        for the embeddings() that follows (once: see _open_matrix), so it is not decrypted
        twice. A model whose rows the thread did not verify at this snapshot's generation
        (busy, an error, a mismatch, another generation) is checked here as before, which
        names a damaged row."""
        damaged: List[str] = []
        with self._lock, self._snapshot():
            self._prefetched = {}
            models = self.model_ids()
            current = self._current_matrices(models)
            checks = self._start_rows_checks(current)
            opened: Dict[str, tuple] = {}
            try:
                damaged += self._identity_rows()[1]
                for model_id, (generation, _, rowid, _) in current.items():
                    opened[model_id] = self._unseal_matrix(model_id, generation, rowid)[0]
            finally:
                self._finish_rows_checks(checks)
            for model_id in models:
                found = current.get(model_id)
                if found and not self._rows_changed(model_id, found[0], found[1]):
                    if opened.get(model_id) is not None:
                        self._prefetched[(model_id, found[0])] = opened[model_id]
                    continue
                damaged += self._rows_embeddings(model_id)[2]
            if damaged:
                self._prefetched = {}
        if damaged:
            raise DamagedRowError(self.path, damaged)

    def _current_matrices(self, models: Sequence[str]
                          ) -> Dict[str, Tuple[int, bytes, int, int]]:
        """model id -> (generation, sealed digest, rowid, sealed length) of each model's
        matrix that is current (built at the registry's generation now); models without one
        are left out."""
        out = {}
        for model_id in models:
            found = self._matrix_row(model_id, _MATRIX_PLACE)
            if found and found[0] == found[-1]:
                out[model_id] = found[:4]
        return out

    def _start_rows_checks(self, current: Dict[str, Tuple[int, bytes, int, int]]
                           ) -> List["_RowsCheck"]:
        """A started _RowsCheck for each model in `current` whose rows are not yet verified
        at its generation and whose matrix is large enough to be worth a thread
        (ASIDE_MIN_BYTES), when a core is free for it (_spare_core). None during a write: rows
        it changed are visible on its own connection only (and the write holds the file, so a
        reader could wait on it)."""
        if self._writing or not _spare_core():
            return []
        checks = []
        for model_id, (generation, digest, _, size) in current.items():
            if self._verified.get(model_id) == generation or size < ASIDE_MIN_BYTES:
                continue
            check = _RowsCheck(self.path, self._key, model_id, generation, digest)
            try:
                check.start()
            except RuntimeError:  # no thread to be had: the rows are checked here instead
                continue
            checks.append(check)
        return checks

    def _finish_rows_checks(self, checks: Sequence["_RowsCheck"]) -> None:
        """Wait for the checks; a model whose rows verified at the generation this snapshot
        read (and with the sealed digest it read) counts as verified, as if _rows_changed had
        found them unchanged; any other outcome leaves it to _rows_changed."""
        for check in checks:
            if check.outcome() == check.generation:
                self._verified[check.model_id] = check.generation

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One read transaction (unless a write is under way), so the counter, the matrix and
        the rows are read as of one moment even while the admin writes."""
        with self._lock:
            if self._db.in_transaction:
                yield
                return
            self._query("BEGIN")
            try:
                yield
            finally:
                self._db.execute("COMMIT")

    def _rows_embeddings(self, model_id: str) -> Tuple[Embeddings, List[int], List[str]]:
        """(embeddings, their row ids, one message per damaged row) read row by row: the
        source of truth, which the matrix is built from and checked against."""
        rows = self._query(f"SELECT e.identity_id, i.scope, e.id, e.sealed {_ROWS_OF_MODEL}",
                           (model_id,))
        idents: List[Tuple[str, str]] = []
        owners, row_ids, raws, damaged = [], [], [], []
        for ident, scope, row_id, sealed in rows:
            try:
                raw = self._decode_raw(row_id, ident, model_id, sealed, scope)
            except _Damaged as exc:
                damaged.append(str(exc))
                continue
            if raws and len(raw) != len(raws[0]):
                damaged.append(f"embedding row {row_id} (identity {ident!r}, model "
                               f"{model_id!r}): {len(raw) // 4} values, the others have "
                               f"{len(raws[0]) // 4}")
                continue
            if not idents or idents[-1][0] != ident:
                idents.append((ident, scope))
            owners.append(len(idents) - 1)
            row_ids.append(row_id)
            raws.append(raw)
        dim = len(raws[0]) // 4 if raws else 0
        vectors = np.frombuffer(b"".join(raws), "<f4").reshape(len(raws), dim)
        return (Embeddings(model_id, vectors, np.asarray(owners, np.int64), tuple(idents)),
                row_ids, damaged)

    def _update_embeddings(self, model_id: str, previous: tuple, changed: set,
                           people_changed: set
                           ) -> Optional[Tuple[Embeddings, List[int], List[str]]]:
        """As _rows_embeddings, inside a write whose start found the model's matrix trusted
        (`previous`: its row ids, owners, vectors, identities), without reading every row:
        the rows this write did not touch (`changed`: row ids from its log) are copied from
        it, the rows it inserted are decrypted, and all are put in the order the rows would
        be read in (identity row, then row id). None when that cannot be done safely (an
        identity this write changed still owns untouched rows, or a new row's length differs
        from the matrix's): the caller then reads every row."""
        prev_ids, prev_owners, prev_vectors, prev_idents = previous
        keep = np.flatnonzero(~np.isin(prev_ids, np.fromiter(changed, np.int64, len(changed))))
        kept_owners = np.unique(prev_owners[keep])
        if any(prev_idents[o][0] in people_changed for o in kept_owners.tolist()):
            return None
        people = {ident: (rowid, scope) for rowid, ident, scope in self._query(
            "SELECT rowid, id, scope FROM identity")}
        owner_rowid = np.array([people.get(ident, (-1,))[0] for ident, _ in prev_idents],
                               np.int64)
        if len(kept_owners) and (owner_rowid[kept_owners] < 0).any():
            return None
        new_ids, new_rowids, raws, damaged = [], [], [], []
        dim = prev_vectors.shape[1]
        for ident, row_id, sealed in self._query(
                "SELECT identity_id, id, sealed FROM embedding WHERE model_id = ? AND id IN "
                "(SELECT key FROM temp.changed WHERE kind = 'embedding') ORDER BY id",
                (model_id,)):
            rowid, scope = people.get(ident, (None, None))
            try:
                raw = self._decode_raw(row_id, ident, model_id, sealed, scope)
            except _Damaged as exc:
                damaged.append(str(exc))
                continue
            if len(raw) != 4 * dim:
                return None
            new_ids.append(row_id)
            new_rowids.append(rowid)
            raws.append(raw)
        row_ids = np.concatenate([prev_ids[keep], np.asarray(new_ids, np.int64)])
        rowids = np.concatenate([owner_rowid[prev_owners[keep]],
                                 np.asarray(new_rowids, np.int64)])
        order = np.lexsort((row_ids, rowids))
        vectors = np.concatenate([prev_vectors[keep], np.frombuffer(
            b"".join(raws), "<f4").reshape(len(raws), dim)])[order]
        rowids = rowids[order]
        starts = np.flatnonzero(np.r_[True, rowids[1:] != rowids[:-1]]) if len(rowids) else []
        by_rowid = {rowid: (ident, scope) for ident, (rowid, scope) in people.items()}
        idents = tuple(by_rowid[int(rowids[i])] for i in starts)
        if any(scope not in SCOPES for _, scope in idents):
            return None  # the rows name it
        owners = np.cumsum(np.r_[False, rowids[1:] != rowids[:-1]]).astype(np.int64) \
            if len(rowids) else np.zeros(0, np.int64)
        return (Embeddings(model_id, vectors, owners, idents), row_ids[order].tolist(),
                damaged)

    def _matrix_row(self, model_id: str, column: str = "") -> Optional[tuple]:
        """(generation, sealed digest[, columns], registry generation) of the model's matrix,
        in one statement (`column`: "m.sealed" for the sealed value, _MATRIX_PLACE to open it
        as a blob); None when there is none (or no matrix table: a registry that only older
        versions have written)."""
        if not self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                           "name = 'matrix'"):
            return None
        columns = "m.generation, m.digest" + (f", {column}" if column else "")
        rows = self._query(f"SELECT {columns}, (SELECT value FROM meta WHERE key = "
                           f"'generation') FROM matrix m WHERE m.model_id = ?", (model_id,))
        if not rows:
            return None
        *found, current = rows[0]
        return (*found, int(current or 0))

    def _matrix_embeddings(self, model_id: str) -> Tuple[Optional[Embeddings], str]:
        """(the embeddings from the model's sealed matrix, "") when it can be trusted, else
        (None, why not) for the log line. The scopes it holds must also be those of the
        identity list (itself read from verified rows or a verified snapshot): the scope
        column is not sealed, and an edit of it that slipped past the triggers (the file
        edited byte by byte) must not leave matching on the old scope."""
        opened, why = self._open_matrix(model_id, take_prefetched=True)
        if opened is None:
            return None, why
        _, _, owners, vectors, identities = opened
        scopes = {i.id: i.scope for i in self._identity_rows()[0]}
        if any(scopes.get(ident) != scope for ident, scope in identities):
            return None, "has a sealed matrix whose scopes differ from the identities now"
        return Embeddings(model_id, vectors, owners, tuple(identities)), ""

    def _open_matrix(self, model_id: str, take_prefetched: bool = False
                     ) -> Tuple[Optional[tuple], str]:
        """(registry_matrix.open_sealed of the model's matrix, "") when its seal verifies, it is
        current and the model's rows hash to its sealed digest; else (None, why not).

        `take_prefetched` (embeddings()): the matrix check_for_matching decrypted at this
        generation, after its rows verified, is handed out instead of decrypting it again,
        once; every other prefetched matrix is dropped then (50 MB each at 100,000 x 128-d).
        Otherwise the rows' digest, when still to be done, runs on a second connection while
        this one decrypts (as in check_for_matching)."""
        found = self._matrix_row(model_id, _MATRIX_PLACE)
        kept = {}
        if take_prefetched:
            kept, self._prefetched = self._prefetched, {}
        if found is None:
            return None, "has no sealed matrix (it was made or last changed by an older version)"
        generation, digest, rowid, size, current = found
        if generation != current:
            return None, (f"has a stale sealed matrix (built at change {generation}, the "
                          f"registry is at {current}: an older version changed it)")
        prefetched = kept.get((model_id, generation))
        if prefetched is not None and not self._writing and \
                self._verified.get(model_id) == generation:
            return prefetched, ""
        checks = self._start_rows_checks({model_id: (generation, digest, rowid, size)})
        try:
            opened, why = self._unseal_matrix(model_id, generation, rowid)
        finally:
            self._finish_rows_checks(checks)
        changed = self._rows_changed(model_id, generation, digest)
        return (None, changed) if changed else (opened, why)

    def _unseal_matrix(self, model_id: str, generation: int, rowid: int
                       ) -> Tuple[Optional[tuple], str]:
        """(registry_matrix.open_sealed of the matrix row `rowid`, "") when its seal verifies
        for this model and generation, else (None, why not). Says nothing about the rows: the
        caller uses it only once they hash to the matrix's sealed digest."""
        try:
            with self._sealed_matrix(rowid) as sealed:
                opened = matrix.open_sealed(self._key, sealed,
                                            matrix.context(model_id, generation, "vectors"))
        except (sqlite3.DatabaseError, TypeError, ValueError, KeyError):
            return None, "has a sealed matrix that does not verify (damaged or altered)"
        if opened[0].get("model_id") != model_id or opened[0].get("generation") != generation:
            return None, "has a sealed matrix of another model or change"
        return opened, ""

    @contextmanager
    def _sealed_matrix(self, rowid: int) -> Iterator[object]:
        """The sealed value of the matrix row `rowid`, for registry_matrix.open_sealed: an
        open sqlite blob (read in chunks, never whole in memory: Python 3.11 and later),
        else the bytes. sqlite3.DatabaseError when it cannot be read."""
        with self._lock:
            if not _BLOB_READS:
                rows = self._db.execute("SELECT sealed FROM matrix WHERE rowid = ?",
                                        (rowid,)).fetchall()
                yield rows[0][0] if rows else b""
                return
            with self._db.blobopen("matrix", "sealed", rowid, readonly=True) as blob:
                yield blob

    def _rows_digest(self, model_id: str, sql: str = matrix.ROWS_SQL) -> bytes:
        """The digest of the model's rows as they are now (registry_matrix.rows_digest), in
        the order of `sql`; b"" when sqlite cannot hand them over: the rows are then read one
        by one, which raises RegistryError with the explanation."""
        with self._lock:
            try:
                return matrix.rows_digest(self._db.execute(sql, (model_id,)))
            except sqlite3.DatabaseError:
                return b""

    def _rows_changed(self, model_id: str, generation: int, sealed_digest) -> str:
        """"" when the model's rows are byte for byte those the matrix was built from (a
        sealed digest of them is stored beside it), or were found so at this generation by
        this reader; else why not, for the log line."""
        if self._verified.get(model_id) == generation:
            return ""
        try:
            sql, wanted = matrix.digest_query(
                self._unseal(sealed_digest, matrix.context(model_id, generation, "digest")))
        except (LockedError, TypeError):
            return "has a sealed matrix that does not verify (damaged or altered)"
        got = self._rows_digest(model_id, sql)
        if not got or got != wanted:
            return "has rows that changed since its sealed matrix was built (one is damaged?)"
        self._verified[model_id] = generation
        return ""

    # -- writing (the caller has checked the admin passphrase) ----------------------------
    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            raise RegistryError(f"The registry {self.path} was opened read-only; changes need "
                                f"the admin passphrase.")
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise RegistryError(_explain(self.path, exc, "cannot be changed")) from None
            self._writing, self._identities_at, self._prefetched = True, None, {}
            done = None  # (generation, identities, damaged) once committed
            try:
                for statement in matrix.SCHEMA + matrix.CHANGE_LOG:
                    self._db.execute(statement)  # registries made before the matrix get it
                self._previous = previous = self._trusted_copies()
                self._db.execute(matrix.CLEAR_CHANGES)
                yield self._db
                if not self._meta("key_check"):  # made before the check value existed
                    self._db.execute("INSERT INTO meta VALUES ('key_check', ?)",
                                     (_b64(self._seal(KEY_CHECK, b"key check")),))
                self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                                 "WHERE key = 'generation'")
                generation = int(self._meta("generation"))
                people = self._rebuild_matrices(generation, previous)
                self._db.execute("COMMIT")
                done = (generation, *people)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:  # the list just built is this generation's: find() after add() uses it
                self._writing, self._identities_at, self._previous = False, done, {}
                self._verified.clear()

    def _trusted_copies(self) -> Dict[str, object]:
        """At the start of a write (its transaction holds the file, so nothing else changes
        it from here): every copy that can be trusted now, to build the next ones from:
        model id -> (row ids, owners, vectors, identities) of its verified matrix, and
        matrix.IDENTITIES -> {identity id: Identity} of the verified list. The rows' digests
        are computed afresh, not taken from this connection's earlier checks: the file may
        have been damaged since. A copy that is missing, stale or damaged is left out, and
        the write then rebuilds that one from all its rows."""
        self._verified.clear()
        out: Dict[str, object] = {}
        for model_id in self.model_ids():
            opened, _ = self._open_matrix(model_id)
            if opened is not None:
                out[model_id] = opened[1:]
        people = self._matrix_identities()
        if people is not None:
            out[matrix.IDENTITIES] = {p.id: p for p in people}
        return out

    def _rebuild_matrices(self, generation: int, previous: Dict[str, object]
                          ) -> Tuple[List[Identity], List[str]]:
        """Inside a write: one sealed matrix per model and the identity list, stamped with
        the new generation. Rows this write did not touch are taken from the copies verified
        at its start (`previous`); the others (all of a model without a trusted copy) are
        decrypted. A model with a damaged row gets none, so matching reads its rows and
        refuses, naming the row, until the admin revokes that identity. Returns the identity
        rows as _decode_identity_rows does."""
        self._db.execute("DELETE FROM matrix WHERE model_id NOT IN "
                         "(SELECT model_id FROM embedding)")  # the identities' too: rebuilt below
        changed = {k for (k,) in self._db.execute(matrix.CHANGED_SQL, ("embedding",))}
        people_changed = {k for (k,) in self._db.execute(matrix.CHANGED_SQL, ("identity",))}
        for model_id in self.model_ids():
            known = previous.get(model_id)
            built = self._update_embeddings(model_id, known, changed, people_changed) \
                if known else None
            emb, row_ids, damaged = built or self._rows_embeddings(model_id)
            if damaged:
                self._db.execute("DELETE FROM matrix WHERE model_id = ?", (model_id,))
                continue
            digest = matrix.ROW_ORDER + self._rows_digest(model_id)
            payload = matrix.pack(model_id, generation, row_ids, emb.vectors, emb.owners,
                                  emb.identities)
            self._store_matrix(model_id, generation, digest, payload)
        known = previous.get(matrix.IDENTITIES)
        known = {k: v for k, v in known.items() if k not in people_changed} if known else None
        people, damaged = self._decode_identity_rows(known)
        if damaged:
            self._db.execute("DELETE FROM matrix WHERE model_id = ?", (matrix.IDENTITIES,))
        else:
            self._store_matrix(matrix.IDENTITIES, generation, self._identity_digest(),
                               matrix.pack_identities(generation, _identity_columns(people)))
        return people, damaged

    def _store_matrix(self, key: str, generation: int, digest: bytes, payload: bytes) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO matrix VALUES (?, ?, ?, ?)",
            (key, generation, self._seal(digest, matrix.context(key, generation, "digest")),
             self._seal(payload, matrix.context(key, generation, "vectors"))))

    def add(self, name: str, scope: str, consent: Consent, embeddings: Dict[str, np.ndarray],
            aliases: Sequence[str] = (), ident: Optional[str] = None,
            created: Optional[str] = None) -> Identity:
        """Store a new identity with its embeddings (model_id -> (n, dim)), in one transaction."""
        name = name.strip()
        if not name:
            raise RegistryError("An identity needs a display name.")
        if scope not in SCOPES:
            raise RegistryError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}.")
        if not consent.by.strip():
            raise RegistryError("A consent record needs who consented (--consent-by).")
        if not any(len(v) for v in embeddings.values()):
            raise RegistryError("An identity needs at least one face embedding.")
        new_id = ident is None
        ident = ident or f"id_{uuid.uuid4().hex[:12]}"
        created = created or _now()
        aliases = tuple(a.strip() for a in aliases if a.strip())
        info = {"name": name, "aliases": list(aliases), "consent": consent.to_dict()}
        with self._write() as db:
            # inside the write transaction, so two enrolments of one name cannot both pass
            taken = {i.name.casefold() for i in self.identities(skip_damaged=True)}
            if name.casefold() in taken and new_id:
                raise RegistryError(f"An identity named '{name}' is already enrolled; revoke "
                                    f"it first, or use `identity add-photos`.")
            db.execute("INSERT INTO identity VALUES (?, ?, ?, ?)",
                       (ident, scope, created, self._seal(json.dumps(info).encode(),
                                                          ident.encode())))
            self._insert_embeddings(db, ident, embeddings)
        return self.find(ident)

    def add_embeddings(self, ident: str, embeddings: Dict[str, np.ndarray]) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM identity WHERE id = ?", (ident,)).fetchone() is None:
                raise RegistryError(f"No identity {ident}.")
            self._insert_embeddings(db, ident, embeddings)

    def _insert_embeddings(self, db, ident: str, embeddings: Dict[str, np.ndarray]) -> None:
        """Insert sealed rows in one statement. The row id is part of each seal, so the ids
        are taken here (the next free ones, as sqlite would pick): safe inside the write's
        BEGIN IMMEDIATE, which no other writer can enter."""
        now = _now()
        row_id = db.execute("SELECT COALESCE(MAX(id), 0) FROM embedding").fetchone()[0]
        rows = []
        for model_id, vectors in embeddings.items():
            for vec in np.asarray(vectors, np.float32).reshape(len(vectors), -1):
                row_id += 1
                rows.append((row_id, ident, model_id, now,
                             self._seal(vec.astype("<f4").tobytes(),
                                        f"{ident}/{model_id}/{row_id}".encode())))
        db.executemany("INSERT INTO embedding (id, identity_id, model_id, created, sealed) "
                       "VALUES (?, ?, ?, ?, ?)", rows)

    def revoke(self, ident: str) -> None:
        """Delete an identity and its embeddings for good: secure_delete overwrites the freed
        pages, the WAL is checkpointed and truncated, and VACUUM rebuilds the file."""
        with self._write() as db:
            db.execute("DELETE FROM embedding WHERE identity_id = ?", (ident,))
            if db.execute("DELETE FROM identity WHERE id = ?", (ident,)).rowcount == 0:
                raise RegistryError(f"No identity {ident}.")
        self._scrub()

    def _scrub(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # a no-op unless still WAL
            self._db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # VACUUM moves older files to it
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- key file, export and import -----------------------------------------------------
    def _readable_vectors(self, ident: Identity, model_id: str) -> np.ndarray:
        """The embeddings of one identity and model that read back, damaged ones left out."""
        vectors = []
        for row_id, sealed in self._query("SELECT id, sealed FROM embedding WHERE identity_id "
                                          "= ? AND model_id = ? ORDER BY id",
                                          (ident.id, model_id)):
            try:
                vectors.append(self._decode_vector(row_id, ident.id, model_id, sealed,
                                                   ident.scope))
            except _Damaged:
                continue
        if not vectors:
            return np.zeros((0, 0), np.float32)
        dim = len(vectors[0])
        return np.asarray([v for v in vectors if len(v) == dim], np.float32)

    def write_key_file(self, path: Path) -> None:
        write_key_file(Path(path), self._key)

    def export(self, path: Path, passphrase: str) -> int:
        """Everything that reads back, as one file sealed under `passphrase`; returns the
        identity count. Damaged rows are left out (`damaged_rows()` names them): an export is
        how a damaged registry is rebuilt, so it must not fail on them."""
        records = []
        for ident in self.identities(skip_damaged=True):
            rec = ident.public_dict()
            rec.pop("embeddings")
            rec["embeddings"] = {}
            for model_id in ident.models:
                rows = self._readable_vectors(ident, model_id)
                if len(rows):
                    rec["embeddings"][model_id] = {
                        "dim": int(rows.shape[1]), "vectors": _b64(rows.astype("<f4").tobytes())}
            records.append(rec)
        write_export(Path(path), passphrase, records)
        return len(records)

    def import_file(self, path: Path, passphrase: str, replace: bool = False) -> Tuple[int, int]:
        """Load an export. Identities with the same id are replaced by the file's copy; with
        `replace`, identities not in the file are revoked, so every machine ends up the same.
        Returns (imported, revoked)."""
        records = read_export(Path(path), passphrase)
        revoked = 0
        with self._write() as db:
            incoming = {r["id"] for r in records}
            existing = [r[0] for r in db.execute("SELECT id FROM identity")]
            for ident in existing:
                if ident in incoming or replace:
                    db.execute("DELETE FROM embedding WHERE identity_id = ?", (ident,))
                    db.execute("DELETE FROM identity WHERE id = ?", (ident,))
                    revoked += ident not in incoming
            for r in records:
                info = {"name": r["name"], "aliases": r.get("aliases", []),
                        "consent": r.get("consent")}
                db.execute("INSERT INTO identity VALUES (?, ?, ?, ?)",
                           (r["id"], r["scope"], r.get("created") or _now(),
                            self._seal(json.dumps(info).encode(), r["id"].encode())))
                emb = {m: np.frombuffer(_unb64(v["vectors"]), dtype="<f4").reshape(-1, v["dim"])
                       for m, v in r["embeddings"].items()}
                self._insert_embeddings(db, r["id"], emb)
        if revoked:
            self._scrub()
        return len(records), revoked


# How long the rows' check on the second connection waits for the file. Short, because the
# connection that started it holds a read lock meanwhile: when a writer is waiting to commit
# (sqlite's PENDING lock), no new reader is let in until that read lock goes, which happens
# only after the check gives up. It then gives up after this long and the rows are checked on
# the first connection, instead of both waiting out the 30 s busy timeout.
ASIDE_BUSY_S = 0.25

# The smallest sealed matrix whose rows are checked in a thread: below it (about 8,000 rows of
# 128-d, 2,000 of 512-d) the digest takes a few ms, and a thread and a second connection cost
# about as much as they save.
ASIDE_MIN_BYTES = 4 << 20


def _spare_core() -> bool:
    """Whether a core is likely free for the rows' check beside the load: more than one core
    for this process, and fewer runnable tasks than cores over the last minute (the load
    average, where the system has one). The two threads use more CPU than one thread doing
    it all (they compete for the GIL and the caches): at 100,000 x 128-d on 2 cores a load
    took 0.81-0.86x as long with a core free, but 1.25x with the machine saturated (load 5:
    bench/registry.py, cold)."""
    from .models import usable_cpus  # here: the registry alone need not read the manifest

    cores = usable_cpus()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows: no load average
        busy = 0.0
    return cores > 1 and busy < cores


class _RowsCheck(threading.Thread):
    """The digest of one model's rows on a second, read-only connection of its own, while the
    registry's connection checks the identity rows and decrypts the matrix: the digest is most
    of a load, and it runs beside that work because it holds the GIL little
    (registry_matrix.rows_digest_by_blocks: sqlite joins the rows, SHA-256 lets go of the GIL)
    and the decryption holds it little too.

    outcome() is the generation at which the rows hashed to the matrix's sealed digest, in
    a snapshot whose registry generation, matrix generation and sealed digest were those the
    caller read (`generation`, `sealed_digest`); None for anything else (the file busy, an
    error, a mismatch, another generation): the caller then checks the rows itself, on its
    own connection, which names a damaged row. Never raises."""

    def __init__(self, path: Path, key: bytes, model_id: str, generation: int,
                 sealed_digest: bytes):
        super().__init__(name=f"consent-guard rows check {model_id}", daemon=True)
        self.path, self.key, self.model_id = path, key, model_id
        self.generation, self.sealed_digest = generation, sealed_digest
        self._outcome: Optional[int] = None

    def run(self) -> None:
        try:
            self._outcome = self._verify()
        except Exception as exc:  # noqa: BLE001 - any failure means "not verified here"
            log.debug("Consent Guard: the rows of %s were not checked aside (%s); checking "
                      "them on the registry's connection", self.model_id, exc)

    def outcome(self) -> Optional[int]:
        self.join()
        return self._outcome

    def _verify(self) -> Optional[int]:
        db = _connect(self.path, read_only=True, timeout=ASIDE_BUSY_S)
        try:
            db.execute("BEGIN")
            found = db.execute("SELECT m.generation, m.digest, (SELECT value FROM meta WHERE "
                               "key = 'generation') FROM matrix m WHERE m.model_id = ?",
                               (self.model_id,)).fetchall()
            if not found or found[0][:2] != (self.generation, self.sealed_digest) or \
                    int(found[0][2] or 0) != self.generation:
                return None
            sql, wanted = matrix.digest_query(unseal(
                self.key, self.sealed_digest,
                matrix.context(self.model_id, self.generation, "digest")))
            got = matrix.rows_digest_by_blocks(db, self.model_id) if sql == matrix.ROWS_SQL \
                else matrix.rows_digest(db.execute(sql, (self.model_id,)))
            db.execute("COMMIT")
            return self.generation if got and got == wanted else None
        finally:
            db.close()


def write_export(path: Path, passphrase: str, records: List[dict]) -> None:
    """An export file holding `records` (as `export` makes them), sealed under `passphrase`."""
    payload = json.dumps({"format": FORMAT, "exported": _now(),
                          "identities": records}).encode()
    salt = secrets.token_bytes(16)
    header = json.dumps({"salt": _b64(salt), "n": SCRYPT_N, "r": SCRYPT_R,
                         "p": SCRYPT_P}).encode()
    body = seal(derive_key(passphrase, salt), payload, EXPORT_MAGIC + header)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as fp:
        fp.write(EXPORT_MAGIC + header + b"\n" + body)
        fp.flush()
        os.fsync(fp.fileno())
    os.replace(tmp, path)
    _restrict(Path(path))


def read_export(path: Path, passphrase: str) -> List[dict]:
    try:
        blob = Path(path).read_bytes()
    except OSError as exc:
        raise RegistryError(f"Cannot read {path}: {exc}") from None
    if not blob.startswith(EXPORT_MAGIC):
        raise RegistryError(f"{path} is not a Consent Guard registry export.")
    header, _, body = blob[len(EXPORT_MAGIC):].partition(b"\n")
    kdf = json.loads(header)
    key = derive_key(passphrase, _unb64(kdf["salt"]), kdf["n"], kdf["r"], kdf["p"])
    try:
        payload = unseal(key, body, EXPORT_MAGIC + header)
    except LockedError:
        raise LockedError(f"Wrong passphrase for the export {path} (or the file was "
                          f"altered).") from None
    data = json.loads(payload)
    if data.get("format") != FORMAT:
        raise RegistryError(f"{path} has export format {data.get('format')}; this Consent "
                            f"Guard reads {FORMAT}.")
    return data["identities"]


def write_key_file(path: Path, key: bytes) -> None:
    """A new key file is 0600. Rewriting one keeps its owner and group, so a lock-down (group
    read for the ComfyUI account) survives `identity key-file`; only access for other
    accounts is taken away."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fp:
        fp.write("consent-guard-registry-key-v1 " + _b64(key) + "\n")
    if not existed:
        _restrict(path)
        return
    try:
        os.chmod(path, path.stat().st_mode & 0o770 & ~0o111)
    except OSError:
        pass


def read_key_file(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise LockedError(f"Cannot read the registry key file {path}: {exc}") from None
    if len(text) != 2 or text[0] != "consent-guard-registry-key-v1":
        raise LockedError(f"{path} is not a Consent Guard registry key file.")
    key = _unb64(text[1])
    if len(key) != 32:
        raise LockedError(f"{path} holds a damaged key.")
    return key


def _connect(path: Path, read_only: bool = False, timeout: float = 30) -> sqlite3.Connection:
    """A connection. Read-only ones (sqlite mode=ro) need only read access to the file; the
    writable ones switch an old WAL registry to the rollback journal (see the module doc).
    `timeout`: seconds to wait for the file while another connection holds it."""
    try:
        if read_only:
            db = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True,
                                 timeout=timeout, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA query_only = ON")
            return db
        db = sqlite3.connect(str(path), timeout=timeout, isolation_level=None,
                             check_same_thread=False)
        use_rollback_journal(db)
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA secure_delete = ON")
        db.execute("PRAGMA foreign_keys = ON")
        return db
    except sqlite3.DatabaseError as exc:
        raise RegistryError(_explain(path, exc, "cannot be opened")) from None


def use_rollback_journal(db: sqlite3.Connection) -> str:
    """Switch the file to journal_mode DELETE (readers then need no write access beside it);
    returns the mode in force. Leaving WAL needs every other connection closed: when ComfyUI
    holds an old WAL connection this waits one second, keeps WAL and tries on the next write."""
    if db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "delete":
        return "delete"
    db.execute("PRAGMA busy_timeout = 1000")
    try:
        return db.execute("PRAGMA journal_mode = DELETE").fetchone()[0].lower()
    except sqlite3.OperationalError:
        return db.execute("PRAGMA journal_mode").fetchone()[0].lower()
    finally:
        db.execute("PRAGMA busy_timeout = 30000")


def _explain(path: Path, exc: Exception, what: str) -> str:
    """A message for sqlite's error: which file, what went wrong, and what to do."""
    text = str(exc)
    hint = ""
    if "readonly" in text or "unable to open" in text or "disk I/O" in text:
        hint = (" This account may lack read access to it, or it is an old registry in WAL "
                "mode, which a reader can only open if it may create files beside it: as the "
                "admin, run `consent-guard lockdown` (or any `identity` change) to switch it "
                "to a journal that readers need no write access for.")
    elif "malformed" in text or "not a database" in text:
        hint = (" The file is damaged: restore it from an export (`consent-guard identity "
                "import FILE`) or a backup.")
    return f"The identity registry {path} {what}: {text}.{hint}"


def _claim(tmp: Path, path: Path) -> None:
    """Put the finished file `tmp` at `path` unless something is there already (another
    process won the race): a hard link fails instead of replacing. Filesystems without hard
    links fall back to an exclusive create of the name, then a rename over it."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise RegistryExists(f"A registry already exists at {path}.") from None
    except OSError:
        pass
    try:
        os.close(os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise RegistryExists(f"A registry already exists at {path}.") from None
    os.replace(tmp, path)


def _restrict(path: Path) -> None:
    """Owner-only permissions where the OS has them (on Windows the folder's ACL applies)."""
    try:
        os.chmod(path, 0o600)
    except OSError:
        pass


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode("ascii"))


def registry_paths(policy, home: Path) -> Tuple[Path, Path]:
    """(registry file, key file) for a policy: its [identities] entries, else the home's."""
    db = Path(policy.registry_path).expanduser() if policy.registry_path else \
        Path(home) / REGISTRY_FILENAME
    key = Path(policy.key_file).expanduser() if policy.key_file else db.with_name(KEY_FILENAME)
    return db, key


def open_for_matching(policy, home: Path, passphrase: Optional[str] = None
                      ) -> Optional[Registry]:
    """The registry a checker reads, or None when there is none (nobody enrolled). Opened
    read-only with the passphrase if given (else $CONSENT_GUARD_PASSPHRASE), else the key file.
    A registry that exists but cannot be opened, or holds a damaged row, raises: checking
    without it would leave people unprotected."""
    db, key = registry_paths(policy, home)
    if not db.exists():
        return None
    passphrase = passphrase if passphrase is not None else os.environ.get(ENV_PASSPHRASE)
    reg = Registry.open(db, passphrase=passphrase or None, key_file=key, read_only=True)
    try:
        reg.check_for_matching()
    except BaseException:
        reg.close()
        raise
    return reg
