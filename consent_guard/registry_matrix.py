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
(SHA-NI: some tens of ms); the larger cost is sqlite handing the rows over, 0.1-0.2 s for
100,000 rows here, most of it making three Python objects per row: now most of a load
(bench/registry.py). So a reader computes it in a thread beside the rest of the load, with
sqlite joining the rows in blocks (rows_digest_by_blocks: the same digest, little GIL). The
rows are read in row id order (ROWS_SQL), which is file order; a
64 MB page cache or mmap saved nothing measurable here, and mmap would turn a disk error into
a crash (SIGBUS) instead of an error.

Layout of the sealed payload: MAGIC, a 4-byte little-endian header length, a JSON header
(model id, generation, dim, count, the (identity id, scope) of each owner), then the row ids
(int64), the owner index of each row (int64) and the vectors (float32), all little-endian.
Readers decrypt it in chunks straight into the arrays (open_sealed). The identity list's
payload is MAGIC and one JSON object: the generation and one list per field (see
pack_identities; versions before it wrote one object per person, which is still read).
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

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
    "CREATE INDEX IF NOT EXISTS embedding_rows ON embedding(model_id)",  # for ROWS_SQL
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


# The rows a digest covers, in the order they are hashed: row id order, through the index
# embedding_rows (SCHEMA), whose entries sqlite keeps in (model_id, rowid) order: only this
# model's rows, no sort, and the table's pages in file order. Digests taken so are stored
# with ROW_ORDER in front.
ROWS_SQL = "SELECT identity_id, id, sealed FROM embedding WHERE model_id = ? ORDER BY id"
ROW_ORDER = b"row order:"

# The order versions before took their digests in (32 bytes, no prefix), still checked so that
# their matrices stay trusted until the next write: identity id, then row id, through the
# index embedding_model. With the random ids enrolment gives, that order visits the table's
# pages at random: 0.15 s against 0.11 s for ROWS_SQL at 100,000 rows (this machine, others
# running; the same with sequential ids). An earlier version that meets a ROW_ORDER digest
# finds it unequal to its own and reads the rows one by one (correct, slower, with a log
# line saying the rows changed) until its own next write.
DIGEST_SQL = ("SELECT identity_id, id, sealed FROM embedding WHERE model_id = ? "
              "ORDER BY identity_id, id")


def digest_query(stored: bytes) -> Tuple[str, bytes]:
    """(the query whose rows a stored digest covers, the SHA-256 to compare): ROWS_SQL for
    one this version took, DIGEST_SQL for one an earlier version took."""
    if stored.startswith(ROW_ORDER):
        return ROWS_SQL, stored[len(ROW_ORDER):]
    return DIGEST_SQL, stored


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


# ROWS_SQL's rows in blocks, each folded by sqlite into one row: how many, the last row id,
# how many have a column of the wrong type, the sealed values joined, and their lengths, the
# row ids (both in decimal, "," between) and the identity ids ("/" between). sqlite feeds an
# aggregate the rows of an ordered subquery in that order (if one ever did not, the digest
# would differ and the rows be read one by one: slower, never wrong).
_BLOCK_SQL = (
    "SELECT count(*), max(id), sum(typeof(identity_id) != 'text' OR typeof(sealed) != 'blob'),"
    " CAST(group_concat(sealed, '') AS BLOB), CAST(group_concat(length(sealed)) AS BLOB),"
    " CAST(group_concat(id) AS BLOB), CAST(group_concat(identity_id, '/') AS BLOB) "
    "FROM (SELECT identity_id, id, sealed FROM embedding WHERE model_id = ?{after} "
    "ORDER BY id LIMIT {block})")
ROWS_BLOCK = 8192  # rows per block: 4.4 MB of 128-d rows; larger blocks cost no less here


def rows_digest_by_blocks(db, model_id: str) -> bytes:
    """rows_digest of ROWS_SQL's rows (the same bytes hashed, the same result, b"" when a
    column has the wrong type), with sqlite doing the per-row work: each block of rows is one
    statement step that hands over a few joined values, not three objects per row.

    Why: Python's sqlite3 lets go of the GIL around every row's step and must take it back
    for the row's objects, so a thread reading row by row waits on any other thread running
    Python (the registry's load checks the identity list meanwhile) and the two barely
    overlap; this holds the GIL only between blocks. Alone it costs about what rows_digest
    costs (bench/registry.py)."""
    h = hashlib.sha256()
    lengths: List[bytes] = []
    row_ids: List[bytes] = []
    idents: List[bytes] = []
    count, last = 0, None
    while True:
        after = "" if last is None else " AND id > ?"
        args = (model_id,) if last is None else (model_id, last)
        n, last, wrong, sealed, sizes, ids, who = db.execute(
            _BLOCK_SQL.format(after=after, block=ROWS_BLOCK), args).fetchone()
        if not n:
            break
        if wrong:
            return b""
        h.update(sealed or b"")
        lengths.append(sizes)
        row_ids.append(ids)
        idents.append(who or b"")
        count += n
        if n < ROWS_BLOCK:
            break
    h.update(b"\0%d\0" % count)
    for numbers in (lengths, row_ids):
        values = np.fromstring(b",".join(numbers), np.int64, sep=",") if count else \
            np.zeros(0, np.int64)
        if len(values) != count:
            return b""
        h.update(values.astype("<i8").tobytes())
    h.update(b"/".join(idents))
    return h.digest()


# The identity rows, for their digest: the plaintext columns joined into one text (NULL, so
# not a str, when one has the wrong type), the rowid and the sealed value.
IDENTITY_DIGEST_SQL = (
    "SELECT CASE WHEN typeof(id) = 'text' AND typeof(scope) = 'text' AND typeof(created) = "
    "'text' THEN id || char(0) || scope || char(0) || created END, rowid, sealed "
    "FROM identity ORDER BY rowid")


def pack_identities(generation: int, columns: Dict[str, list]) -> bytes:
    """The identity list as columns (field name -> one value per person): for 10,000 people,
    parsing it and making the Identity objects took 0.07 s against 0.11 s for one JSON object
    per person (this machine, others running). Versions before this one wrote
    {"identities": [object per person]} and cannot read this: they read the identity rows
    instead (and log that the list does not verify) until their own next write."""
    return MAGIC + json.dumps({"generation": int(generation), "columns": columns}).encode()


def unpack_identities(payload: bytes) -> Tuple[int, Union[Dict[str, list], List[dict]]]:
    """(generation, columns) of a list pack_identities made, or (generation, one dict per
    person) of one that an earlier version made."""
    if not payload.startswith(MAGIC):
        raise MatrixError("not a Consent Guard matrix")
    data = json.loads(payload[len(MAGIC):])
    people = data["columns"] if "columns" in data else list(data["identities"])
    return int(data["generation"]), people


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
    """(header, row ids, owners, vectors, identities) of a plain payload. The arrays are
    read-only views of `payload` (no copy: at 100,000 x 512 that is 200 MB not copied)."""
    if not payload.startswith(MAGIC):
        raise MatrixError("not a Consent Guard matrix")
    at = len(MAGIC)
    (size,) = struct.unpack_from("<I", payload, at)
    header = json.loads(payload[at + 4:at + 4 + size])
    at += 4 + size
    count, dim = _shape(header)
    if len(payload) != at + count * (16 + 4 * dim):
        raise MatrixError(f"{len(payload)} bytes, the header describes {count} x {dim}")
    return (header, *_arrays(header, np.frombuffer(payload, np.uint8, offset=at)))


class NotVerified(ValueError):
    """A sealed matrix whose seal does not verify, or that is cut short or does not parse
    before its seal could be checked: damage or an alteration (the rows are read instead)."""


# Bytes decrypted per step by open_sealed: large enough that the Python loop costs nothing,
# small enough to stay in the CPU cache on the way from sqlite to the output array.
CHUNK = 1 << 20


def open_sealed(key: bytes, sealed, context: bytes) -> Tuple[dict, np.ndarray, np.ndarray,
                                                               np.ndarray, List[Tuple[str, str]]]:
    """As unpack(), for a payload sealed under `key` with `context` (nonce, ciphertext, tag:
    what Registry._seal makes), which it decrypts in CHUNK steps straight into one numpy array.
    `sealed` is bytes or an open sqlite3.Blob (anything with len() and slicing): read from a
    blob, the ciphertext is never in memory whole.

    Why not one AESGCM.decrypt of the whole value: at 100,000 x 128-d that makes a 51 MB
    bytes object from sqlite and another from the decryption, and filling fresh memory costs
    more here than the AES itself (about 0.015 s for 51 MB): reading the matrix took 0.15-0.25
    s that way, 0.05-0.09 s this way (this machine, others running). The arrays start on an
    aligned address (after a plain payload's header they do not), which halves the cost of the
    matrix product that matches faces against them (0.034 s against 0.016 s for 4 faces and
    100,000 x 128-d, this machine).

    The plaintext is used only after the tag verified (GCM's finalize). The header is read
    before that, to size the output: anything in it that does not add up to the sealed
    length raises NotVerified, so a damaged header cannot ask for more memory than the
    value holds. Raises NotVerified when the seal does not verify."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    source = memoryview(sealed) if isinstance(sealed, (bytes, bytearray)) else sealed
    end = len(source) - 16
    at = 12 + len(MAGIC) + 4
    if end < at:
        raise NotVerified(f"{len(source)} bytes: too short for a sealed matrix")
    # the tag is read last: sqlite reaches the end of a blob by walking the chain of its
    # pages, so reading it first would read the whole value twice
    decryptor = Cipher(algorithms.AES(key), modes.GCM(bytes(source[:12]))).decryptor()
    decryptor.authenticate_additional_data(context)
    head = _decrypt(decryptor, source, 12, at)
    if head[:len(MAGIC)] != MAGIC:
        raise NotVerified("not a Consent Guard matrix")
    (size,) = struct.unpack_from("<I", head, len(MAGIC))
    if at + size > end:
        raise NotVerified(f"a header of {size} bytes in a value of {len(source)}")
    try:
        header = json.loads(_decrypt(decryptor, source, at, at + size))
        count, dim = _shape(header)
    except (ValueError, KeyError, TypeError) as exc:
        raise NotVerified(f"an unreadable header ({exc})") from None
    at += size
    if end - at != count * (16 + 4 * dim):
        raise NotVerified(f"{end - at} bytes of rows, the header describes {count} x {dim}")
    # update_into needs 15 bytes to spare. A bytearray, not np.empty: numpy asks the kernel
    # for huge pages for large arrays, and the first such request in a process sometimes
    # stalls (0.15-0.2 s here) while memory is compacted; a bytearray's pages come as needed.
    body = np.frombuffer(bytearray(end - at + 16), np.uint8)
    _decrypt(decryptor, source, at, end, memoryview(body))
    try:
        decryptor.finalize_with_tag(bytes(source[end:]))
    except InvalidTag:
        raise NotVerified("its seal does not verify") from None
    body.flags.writeable = False
    try:
        return (header, *_arrays(header, body))
    except (ValueError, KeyError, TypeError) as exc:
        raise MatrixError(f"a sealed matrix that does not parse ({exc})") from None


def _decrypt(decryptor, source, start: int, stop: int, out: Optional[memoryview] = None
             ) -> bytes:
    """source[start:stop] through `decryptor` into `out` (at least stop - start + 15 bytes),
    CHUNK bytes at a time; without `out`, into a new buffer, returned trimmed."""
    trim = out is None
    if trim:
        out = memoryview(bytearray(stop - start + 15))
    at = start
    while at < stop:
        data = source[at:min(at + CHUNK, stop)]
        decryptor.update_into(data, out[at - start:at - start + len(data) + 15])
        at += len(data)
    return bytes(out[:stop - start]) if trim else b""


def _shape(header: dict) -> Tuple[int, int]:
    count, dim = int(header["count"]), int(header["dim"])
    if count < 0 or dim < 0:
        raise MatrixError(f"a header that describes {count} x {dim}")
    return count, dim


def _arrays(header: dict, body: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray,
                                                     List[Tuple[str, str]]]:
    """(row ids, owners, vectors, identities): views of `body`, the bytes after the header."""
    count, dim = _shape(header)
    row_ids = np.frombuffer(body, "<i8", count, 0)
    owners = np.frombuffer(body, "<i8", count, 8 * count)
    vectors = np.frombuffer(body, "<f4", count * dim, 16 * count).reshape(count, dim)
    identities = [(str(i), str(s)) for i, s in header["identities"]]
    return row_ids, owners, vectors, identities
