"""The registry's sealed matrix: every embedding of one model in one AES-GCM sealed value.

Why: matching needs all of a model's embeddings at start and after every change. Reading them
row by row costs one sqlite row, one decryption and one small array per embedding (2 to 3.5 s
for 100,000 128-d on this 2-core machine, others running: bench/registry.py); one sealed
matrix is one read and one decryption. The identity list is kept the same way (IDENTITIES).

The rows of the `embedding` table stay the source of truth (each sealed on its own, so one
damaged row loses one embedding, and export and import work on them). The matrix is a copy,
updated in the same transaction as every write, and it is trusted only while:
- its seal verifies (its additional data names the model and the write generation it was built
  at, so a matrix cannot be moved to another model or passed off as current);
- its generation equals the registry's write counter (any writer, this version or an older one,
  bumps it; a stale matrix is never read);
- a sealed digest of the model's rows, taken when it was built, still equals the rows now: one
  flipped byte in any embedding row changes it, and the reader then reads the rows one by one,
  which names the damaged row and refuses (fail closed).
Triggers in the file delete a model's matrix (and the identity list) whenever one of its rows
is inserted, changed or deleted, by any program, older versions of Consent Guard included: so
revoking someone, with secure_delete on, also wipes the copy of their vectors, whoever revokes.
The format number of the registry stays 1: older versions read and write it as before.

Writes are incremental: at its start a write checks the copies as a reader would (seal,
generation, digest of the rows, computed afresh), and at its end builds the next ones from
them plus the rows it touched, which temp triggers of its own connection log (CHANGE_LOG):
only those rows are decrypted. Row ids can be reused (a delete, then an insert), so the log,
not the ids, says which rows changed. A copy that did not verify is rebuilt from every row.

Why the digest hashes every byte of every row, not just the AES-GCM tags (the last 16 bytes
of each sealed value): the tag authenticates the ciphertext only when it is checked, and
checking it is the per-row decryption the digest exists to avoid. A digest of (row id,
identity id, tag) plus a length check would pass a row with a flipped byte in its body; the
matrix would still match with the right vector, but the damaged row would go unnoticed until
an export silently dropped it. Hashing 100,000 rows of 540 bytes is about 54 MB of SHA-256
(SHA-NI: some tens of ms); the larger cost is sqlite handing the rows over.

Layout of the sealed payload: MAGIC, a 4-byte little-endian header length, a JSON header
(model id, generation, dim, count, the (identity id, scope) of each owner), then the row ids
(int64), the owner index of each row (int64) and the vectors (float32), all little-endian.
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Iterable, List, Sequence, Tuple

import numpy as np

MAGIC = b"consent-guard-matrix/1\n"

# The identities (names, aliases, consent, scope, counts) are kept the same way, under this
# key, which no embedder's model id can be: 10,000 identity rows cost as much to decrypt and
# parse as the matrix of 100,000 vectors.
IDENTITIES = "*identities*"

# Executed one by one inside a write transaction (executescript would commit it).
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS matrix (model_id TEXT PRIMARY KEY, "
    "generation INTEGER NOT NULL, digest BLOB NOT NULL, sealed BLOB NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS matrix_stale_insert AFTER INSERT ON embedding BEGIN "
    f"DELETE FROM matrix WHERE model_id IN (NEW.model_id, '{IDENTITIES}'); END",
    "CREATE TRIGGER IF NOT EXISTS matrix_stale_update AFTER UPDATE ON embedding BEGIN "
    f"DELETE FROM matrix WHERE model_id IN (OLD.model_id, NEW.model_id, '{IDENTITIES}'); END",
    "CREATE TRIGGER IF NOT EXISTS matrix_stale_delete AFTER DELETE ON embedding BEGIN "
    f"DELETE FROM matrix WHERE model_id IN (OLD.model_id, '{IDENTITIES}'); END",
    "CREATE TRIGGER IF NOT EXISTS matrix_stale_identity_insert AFTER INSERT ON identity "
    "BEGIN DELETE FROM matrix; END",
    "CREATE TRIGGER IF NOT EXISTS matrix_stale_identity_update AFTER UPDATE ON identity "
    "BEGIN DELETE FROM matrix; END",
    "CREATE TRIGGER IF NOT EXISTS matrix_stale_identity_delete AFTER DELETE ON identity "
    "BEGIN DELETE FROM matrix; END",
)

# The writer's own log of the rows its current write touched (temp: this connection only, never
# in the file). The next copies are then built from the previous verified ones plus these rows
# alone: an enrolment on a registry of 100,000 embeddings decrypts its own few rows, not all.
# Cleared at the start of every write (CLEAR_CHANGES).
CHANGE_LOG = (
    "CREATE TEMP TABLE IF NOT EXISTS changed (kind TEXT NOT NULL, key NOT NULL, "
    "PRIMARY KEY (kind, key)) WITHOUT ROWID",
    "CREATE TEMP TRIGGER IF NOT EXISTS changed_embedding_insert AFTER INSERT ON main.embedding "
    "BEGIN INSERT OR IGNORE INTO changed VALUES ('embedding', NEW.id); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS changed_embedding_update AFTER UPDATE ON main.embedding "
    "BEGIN INSERT OR IGNORE INTO changed VALUES ('embedding', OLD.id), ('embedding', NEW.id); "
    "END",
    "CREATE TEMP TRIGGER IF NOT EXISTS changed_embedding_delete AFTER DELETE ON main.embedding "
    "BEGIN INSERT OR IGNORE INTO changed VALUES ('embedding', OLD.id); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS changed_identity_insert AFTER INSERT ON main.identity "
    "BEGIN INSERT OR IGNORE INTO changed VALUES ('identity', NEW.id); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS changed_identity_update AFTER UPDATE ON main.identity "
    "BEGIN INSERT OR IGNORE INTO changed VALUES ('identity', OLD.id), ('identity', NEW.id); "
    "END",
    "CREATE TEMP TRIGGER IF NOT EXISTS changed_identity_delete AFTER DELETE ON main.identity "
    "BEGIN INSERT OR IGNORE INTO changed VALUES ('identity', OLD.id); END",
)
CLEAR_CHANGES = "DELETE FROM temp.changed"
CHANGED_SQL = "SELECT key FROM temp.changed WHERE kind = ?"


# The rows a digest covers, in index order (model_id, identity_id, rowid): only this model's
# rows are read, and no sort is needed.
DIGEST_SQL = ("SELECT identity_id, id, sealed FROM embedding WHERE model_id = ? "
              "ORDER BY identity_id, id")


class MatrixError(ValueError):
    """A payload that opened (its seal verified) but does not parse: a bug, not damage."""


def context(model_id: str, generation: int, part: str) -> bytes:
    """AES-GCM additional data: binds a sealed part to its model and write generation."""
    return f"matrix/{part}/{model_id}/{generation}".encode()


def rows_digest(rows: Iterable[Tuple[object, object, object]]) -> bytes:
    """SHA-256 over every row's sealed bytes, the length of each, the row ids and the
    identity ids (one flipped byte in any of them changes it; so does moving bytes from one
    row's end to the next one's start, which keeps the concatenation), or b"" (matching no
    stored digest) when a column has the wrong type: a flipped bit can turn a blob into text.
    `rows` is a cursor of (identity id, row id, sealed) or a sequence of such rows.

    Every byte is hashed, not just the AES-GCM tags: a tag authenticates its ciphertext only
    when it is checked (which is the decryption this digest avoids), so a digest of the tags
    would miss a flipped byte in the body of a row. The rows are taken from sqlite in blocks
    and each block's sealed values are hashed as one joined buffer: as fast as one update per
    row (bench/registry.py; most of the time is sqlite handing the rows over), and the
    lengths and ids it also hashes cost little."""
    h = hashlib.sha256()
    idents: List[str] = []
    row_ids: List[int] = []
    lengths: List[int] = []
    blocks = iter(lambda: rows.fetchmany(4096), []) if hasattr(rows, "fetchmany") \
        else [list(rows)]
    try:
        for block in blocks:
            sealed = [r[2] for r in block]
            h.update(b"".join(sealed))  # TypeError unless every one is bytes
            lengths += map(len, sealed)
            idents += [r[0] for r in block]
            row_ids += [r[1] for r in block]
        h.update(b"\0%d\0" % len(idents))
        h.update(np.asarray(lengths, "<i8").tobytes())
        h.update(np.asarray(row_ids, "<i8").tobytes())  # TypeError/ValueError unless numbers
        h.update("/".join(idents).encode("utf-8", "surrogatepass"))  # TypeError unless str
    except (TypeError, ValueError, OverflowError):
        return b""
    return h.digest()


# The identity rows, for their digest: the plaintext columns joined into one text (NULL, so
# not a str, when one has the wrong type), the rowid and the sealed value.
IDENTITY_DIGEST_SQL = (
    "SELECT CASE WHEN typeof(id) = 'text' AND typeof(scope) = 'text' AND typeof(created) = "
    "'text' THEN id || char(0) || scope || char(0) || created END, rowid, sealed "
    "FROM identity ORDER BY rowid")


def pack_identities(generation: int, people: Sequence[dict]) -> bytes:
    return MAGIC + json.dumps({"generation": int(generation), "identities": list(people)}
                              ).encode()


def unpack_identities(payload: bytes) -> Tuple[int, List[dict]]:
    if not payload.startswith(MAGIC):
        raise MatrixError("not a Consent Guard matrix")
    data = json.loads(payload[len(MAGIC):])
    return int(data["generation"]), list(data["identities"])


def pack(model_id: str, generation: int, row_ids: Sequence[int], vectors: np.ndarray,
         owners: np.ndarray, identities: Sequence[Tuple[str, str]]) -> bytes:
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    header = json.dumps({"model_id": model_id, "generation": int(generation),
                         "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
                         "count": len(vectors),
                         "identities": [list(i) for i in identities]}).encode()
    return b"".join((MAGIC, struct.pack("<I", len(header)), header,
                     np.asarray(row_ids, "<i8").tobytes(), np.asarray(owners, "<i8").tobytes(),
                     vectors.tobytes()))


def unpack(payload: bytes) -> Tuple[dict, np.ndarray, np.ndarray, np.ndarray,
                                     List[Tuple[str, str]]]:
    """(header, row ids, owners, vectors, identities). The arrays are read-only views of
    `payload` (no copy: at 100,000 x 512 that is 200 MB not copied)."""
    if not payload.startswith(MAGIC):
        raise MatrixError("not a Consent Guard matrix")
    at = len(MAGIC)
    (size,) = struct.unpack_from("<I", payload, at)
    header = json.loads(payload[at + 4:at + 4 + size])
    at += 4 + size
    count, dim = int(header["count"]), int(header["dim"])
    if len(payload) != at + count * (16 + 4 * dim):
        raise MatrixError(f"{len(payload)} bytes, the header describes {count} x {dim}")
    row_ids = np.frombuffer(payload, "<i8", count, at)
    owners = np.frombuffer(payload, "<i8", count, at + 8 * count)
    vectors = np.frombuffer(payload, "<f4", count * dim, at + 16 * count).reshape(count, dim)
    identities = [(str(i), str(s)) for i, s in header["identities"]]
    return header, row_ids, owners, vectors, identities
