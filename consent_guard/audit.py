"""The audit log: one JSON line per decision, append-only, hash-chained, rotated by size.

What a record holds (keys always in this order):
  time          UTC, ISO-8601 with milliseconds ("2025-01-31T18:04:05.123Z")
  user, pid     the OS account and process that made the decision
  source        who asked: "comfyui", "a1111", "cli", ...
  client_id     the UI's client (ComfyUI's client id), or null
  kind          "image", "input_image" or "prompt"
  decision      "allow", "censor" or "block"
  categories    the reasons' policy categories, sorted, without repeats
  minor         true when a category is about minors ("minor_sexual", "minor_explicit", ...)
  reasons       [{check, label, category, score}], no regions
  identities    registry ids of protected people: faces that matched, prompts that named them
  prompt        [audit] prompt = "hash": {"sha256": ...} of the UTF-8 text; "text": the text;
  negative        "none": both keys are left out (and the lexicon's matched words, which are
                  pieces of the prompt, are dropped from the reasons' labels)
  image_sha256  image_digest() of the checked pixels: never the pixels, never embeddings
  error         the verdict's error (a check that failed, so the decision failed closed)
  note          free text from the adapter
  seq           the record's number, 1 for the first anchored record, +1 for each record after
  prev          sha256 of the previous line's bytes (without its newline), or null for the
                very first line: editing or removing a line breaks the chain (verify_chain)
  mac           HMAC-SHA256, under the audit key, of the line up to this field (closed by "}")

Anchoring. A hash chain alone proves nothing against someone who can write the file: they can
edit a line and recompute every "prev" after it, cut lines from the end, or cut them from the
start. So each record also carries a MAC under a secret key kept in "<log stem>.key" (created
on first use, mode 0600; `consent-guard lockdown` makes it admin:group 0640 so the admin and the
ComfyUI account alone read it), and a head file "<log stem>.head", apart from the log, holds
the number of the last record, the number of the first record still kept (rotation drops
old files) and the digest of the last line, under the same key; it is rewritten in place on
every append. verify_log() then detects, without the key being known to whoever tampered:
an edited line (its MAC), lines removed anywhere (the numbers jump, or the head's first/last
disagree with the log), a tail cut off or the log emptied (the head is ahead of the log), and
a deleted head (no head while anchored records exist; a writer that finds none rebuilds it and
marks the head "rebuilt_at", which verify reports). What it cannot show: anything done by
someone who holds the key (the admin, and the account ComfyUI runs as, which must write the
log: such a person can rewrite the log and the head consistently); the log, the head and the
key deleted together (nothing is left to compare; keep a copy of the head elsewhere, e.g. in
`consent-guard audit --verify` output sent off the machine); and records lost to a power cut
(no fsync). Logs written before MACs existed stay readable: their lines are chain-checked as
before and verify_log notes that they are "not anchored".

Writing: each record is one os.write() of one line to a file opened with O_APPEND, under a
thread lock and an OS file lock (fcntl.flock on POSIX, msvcrt.locking on Windows) on
"<log>.lock", so several threads and processes can append; "prev" is read from the file's
actual last line under that lock. No fsync (a decision per generated image must stay cheap; a
power cut can lose the last records, which verify_chain cannot see). record() never raises:
a full disk, a read-only folder or anything else returns False and sets `last_error`; the
adapter decides what that means (in enforce mode: do not save).
"""
from __future__ import annotations

import base64
import datetime as _dt
import errno
import getpass
import hashlib
import hmac
import json
import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

from .verdict import Verdict

AUDIT_FILENAME = "audit.log"
KINDS = ("image", "input_image", "prompt")
PROMPT_MODES = ("hash", "text", "none")
LOCK_TIMEOUT_S = 10.0
KEY_MAGIC = "consent-guard-audit-key-v1"
_MAC_TAIL = re.compile(rb',"mac":"([0-9a-f]{64})"\}$')

log = logging.getLogger("consent_guard")

if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(fd: int) -> bool:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (containers), or Windows oddities
        pass
    try:
        return f"uid:{os.getuid()}"  # type: ignore[attr-defined]
    except Exception:
        return "unknown"


def prompt_digest(text: str) -> str:
    """sha256 (hex) of the prompt's UTF-8 bytes: the same prompt always gives the same value,
    so an admin can check whether a known prompt was used without the log holding it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def image_digest(pixels) -> str:
    """sha256 (hex) of an array's shape, dtype and bytes (C order). Only this is logged."""
    import numpy as np

    arr = np.ascontiguousarray(np.asarray(pixels))
    if arr.dtype.hasobject:
        raise TypeError(f"not an array of numbers: {type(pixels).__name__}")
    h = hashlib.sha256(f"{'x'.join(map(str, arr.shape))}|{arr.dtype.str}|".encode("ascii"))
    h.update(memoryview(arr).cast("B") if arr.size else b"")
    return h.hexdigest()


def line_digest(line: bytes) -> str:
    """What the next record's "prev" holds: sha256 of a line's bytes without its newline."""
    return hashlib.sha256(line.rstrip(b"\r\n")).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def _last_line(path: Path) -> Optional[bytes]:
    """The file's last non-empty line (without newline), or None when it is empty/absent."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            pos, tail = end, b""
            while pos > 0:
                step = min(4096, pos)
                pos -= step
                f.seek(pos)
                tail = f.read(step) + tail
                stripped = tail.rstrip(b"\r\n")
                if b"\n" in stripped:
                    return stripped.rsplit(b"\n", 1)[1]
            stripped = tail.rstrip(b"\r\n")
            return stripped or None
    except FileNotFoundError:
        return None


def log_files(path: Union[str, Path]) -> List[Path]:
    """The log and its rotated copies that exist, oldest first (audit.log.N ... audit.log)."""
    path = Path(path)
    rotated = []
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)$")
    try:
        for p in path.parent.iterdir():
            m = pattern.match(p.name)
            if m and p.is_file():
                rotated.append((int(m.group(1)), p))
    except OSError:
        pass
    files = [p for _, p in sorted(rotated, reverse=True)]
    if path.is_file():
        files.append(path)
    return files


class AuditLog:
    """Append decisions to `path`. `prompt_mode`: "hash", "text" or "none" (see module doc).
    Rotates to path.1 ... path.<backups> when a record would take the file past `max_bytes`."""

    def __init__(self, path: Union[str, Path], prompt_mode: str = "hash",
                 max_bytes: int = 10 * 2 ** 20, backups: int = 5):
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.key_path = key_path_for(self.path)
        self.head_path = head_path_for(self.path)
        self._key: Optional[bytes] = None
        self.prompt_mode = prompt_mode
        self.max_bytes = max(1, int(max_bytes))
        self.backups = max(1, int(backups))
        self.last_error: Optional[str] = None
        self._logged: Optional[str] = None  # the error last sent to the logger
        self._rotate_error: Optional[str] = None
        self._lock = threading.Lock()
        self._written = threading.local()  # .seq: the number of this thread's last record
        self._user = _os_user()

    @property
    def healthy(self) -> bool:
        """False while the last write failed (the message is in `last_error`)."""
        return self.last_error is None

    # -- building the record ---------------------------------------------------------------

    def _prompt_field(self, text: Optional[str]):
        if text is None:
            return None
        return {"sha256": prompt_digest(text)} if self.prompt_mode == "hash" else text

    def build(self, kind: str, verdict: Verdict, *, source: str, client_id=None, prompt=None,
              negative=None, image=None, image_sha256=None, note=None) -> dict:
        """The record as a dict, without "prev" (record() adds it under the lock)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        categories = sorted({r.category for r in verdict.reasons})
        identities = {f.identity for f in verdict.faces if f.identity}
        identities |= {r.label for r in verdict.reasons
                       if r.category == "protected_identity" and r.label}
        redact = self.prompt_mode == "none"
        reasons = [{"check": r.check,
                    "label": None if redact and r.check == "prompt_lexicon" else r.label,
                    "category": r.category, "score": round(float(r.score), 4)}
                   for r in verdict.reasons]
        if image is not None and image_sha256 is None:
            try:
                image_sha256 = image_digest(image)
            except Exception as exc:  # an odd object: keep the decision, say why no hash
                note = (f"{note}; " if note else "") + f"image not hashed: {exc}"
        rec = {"time": _now(), "user": self._user, "pid": os.getpid(), "source": source,
               "client_id": None if client_id is None else str(client_id), "kind": kind,
               "decision": verdict.decision.value, "categories": categories,
               "minor": any(c.startswith("minor") for c in categories), "reasons": reasons,
               "identities": sorted(identities)}
        if self.prompt_mode != "none":
            rec["prompt"] = self._prompt_field(prompt)
            rec["negative"] = self._prompt_field(negative)
        rec.update({"image_sha256": image_sha256, "error": verdict.error, "note": note})
        return rec

    # -- writing ----------------------------------------------------------------------------

    def record(self, kind: str, verdict: Verdict, *, source: str, client_id=None, prompt=None,
               negative=None, image=None, image_sha256=None, note=None) -> bool:
        """Append one record. True when it is on disk (in the OS's hands: no fsync); False
        when it could not be written, with the reason in `last_error`. Never raises."""
        try:
            rec = self.build(kind, verdict, source=source, client_id=client_id, prompt=prompt,
                             negative=negative, image=image, image_sha256=image_sha256,
                             note=note)
            with self._lock:
                self._written.seq = self._append(rec)
        except OSError as exc:
            text = exc.strerror or str(exc)
            code = f" ({errno.errorcode.get(exc.errno, exc.errno)})" if exc.errno else ""
            other = f" ({exc.filename})" if exc.filename and \
                str(exc.filename) != str(self.path) else ""
            self._fail(f"audit log {self.path}: cannot write{other}: {text}{code}"
                       + (" - the disk is full" if exc.errno == errno.ENOSPC else ""))
            return False
        except Exception as exc:  # a bug must not stop generation either
            self._fail(f"audit log {self.path}: record not written: "
                       f"{type(exc).__name__}: {exc}")
            return False
        if self.last_error is not None:
            log.warning("audit log %s: writing again (after: %s)", self.path, self.last_error)
        self.last_error = self._logged = None
        return True

    def append(self, kind: str, verdict: Verdict, **fields) -> Optional[int]:
        """record(), returning the new record's number ("seq"), or None where record() would
        return False: the provenance mark carries the number (consent_guard/provenance.py).
        The number is kept per thread, so threads recording at once each get their own."""
        self._written.seq = None
        if not self.record(kind, verdict, **fields):
            return None
        return self._written.seq

    def _fail(self, message: str) -> None:
        self.last_error = message
        if message != self._logged:
            self._logged = message
            try:
                log.error("%s", message)
            except Exception:  # pragma: no cover - a broken handler must not raise here
                pass

    def _append(self, rec: dict) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.lock_path, os.O_RDWR | os.O_CREAT):
            return self._append_locked(rec)

    def ensure_key(self) -> bytes:
        """The audit MAC key, created (0600) on first use. Call under the log lock, or where
        no writer runs yet (`lockdown`)."""
        if self._key is None:
            if not self.key_path.exists():
                _create_key(self.key_path)
            self._key = read_key(self.key_path)
        return self._key

    def _append_locked(self, rec: dict) -> int:
        key = self.ensure_key()
        last = _last_line(self.path)
        if last is None:  # fresh file (first ever, or just rotated): chain to the rotated one
            last = _last_line(self.path.with_name(self.path.name + ".1"))
        head = read_head(self.head_path, key)
        last_seq = _seq_of(last)
        seq = (head["count"] if head else last_seq or 0) + 1
        rec["seq"] = seq
        rec["prev"] = None if last is None else line_digest(last)
        line = sign_record(key, rec)
        data = line + b"\n"
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        dropped = False
        if size and size + len(data) > self.max_bytes:
            try:
                dropped = self._rotate()
            except OSError as exc:  # e.g. Windows, a reader holds the file: keep appending
                message = f"audit log {self.path}: cannot rotate: {exc}"
                if message != self._rotate_error:
                    self._rotate_error = message
                    log.warning("%s", message)
        self._write_line(data, last)
        anchored_before = head is not None or last_seq is not None
        first = head["first"] if head else (seq if not anchored_before else
                                            _first_seq(log_files(self.path)) or seq)
        if dropped:
            first = _first_seq(log_files(self.path)) or seq
        rebuilt = head.get("rebuilt_at") if head else (seq if anchored_before else None)
        write_head(self.head_path, key, {"count": seq, "first": first,
                                         "last": line_digest(line), "rebuilt_at": rebuilt})
        return seq

    def _write_line(self, data: bytes, last: Optional[bytes]) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _BINARY, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and last is not None and not _ends_with_newline(self.path, size):
                data = b"\n" + data  # a torn line from elsewhere: start ours on a new line
            try:
                written = os.write(fd, data)
            except OSError:
                _truncate(fd, size)
                raise
            if written != len(data):  # short write (disk full): take the torn line back
                _truncate(fd, size)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        finally:
            os.close(fd)

    def _rotate(self) -> bool:
        """audit.log.<backups> is dropped; .k -> .k+1; audit.log -> audit.log.1. Returns
        whether a file was dropped (the head's first record number then moves on)."""
        name = self.path.name
        oldest = self.path.with_name(f"{name}.{self.backups}")
        dropped = oldest.exists()
        if dropped:
            oldest.unlink()
        for k in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{name}.{k}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{name}.{k + 1}"))
        os.replace(self.path, self.path.with_name(f"{name}.1"))
        return dropped


@contextmanager
def _file_lock(lock_path: Path, flags: int):
    """Hold the OS lock on `lock_path` (waits up to LOCK_TIMEOUT_S)."""
    lock_fd = os.open(lock_path, flags | _BINARY, 0o600)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        delay = 0.001
        while not _lock(lock_fd):
            if time.monotonic() > deadline:
                raise OSError(errno.EWOULDBLOCK, f"another process holds {lock_path} "
                                                 f"for more than {LOCK_TIMEOUT_S:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        try:
            yield
        finally:
            _unlock(lock_fd)
    finally:
        os.close(lock_fd)


# -- the key, the MAC and the head -----------------------------------------------------------

def key_path_for(path: Union[str, Path]) -> Path:
    """Where the MAC key of the log at `path` lives: audit.log -> audit.key."""
    return Path(path).with_suffix(".key")


def head_path_for(path: Union[str, Path]) -> Path:
    """Where the head of the log at `path` lives: audit.log -> audit.head."""
    return Path(path).with_suffix(".head")


def _create_key(path: Path) -> None:
    """A new random key, written with O_EXCL so two first writers cannot each make one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w", encoding="ascii") as fp:
        fp.write(f"{KEY_MAGIC} {base64.b64encode(os.urandom(32)).decode('ascii')}\n")


def read_key(path: Path) -> bytes:
    """The MAC key in `path`; OSError or ValueError say why it cannot be used."""
    parts = Path(path).read_text(encoding="ascii").split()
    if len(parts) != 2 or parts[0] != KEY_MAGIC:
        raise ValueError(f"{path} is not a Consent Guard audit key file")
    key = base64.b64decode(parts[1].encode("ascii"))
    if len(key) != 32:
        raise ValueError(f"{path} holds a damaged audit key")
    return key


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def sign_record(key: bytes, rec: dict) -> bytes:
    """The record's line: its JSON with "mac" last, the MAC of the JSON before it."""
    body = json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return body[:-1] + b',"mac":"' + _mac(key, body).encode("ascii") + b'"}'


def record_mac_ok(key: bytes, raw: bytes) -> bool:
    """Whether the line's "mac" is the MAC of the rest of it under `key`."""
    m = _MAC_TAIL.search(raw)
    if m is None:
        return False
    body = raw[:m.start()] + b"}"
    return hmac.compare_digest(_mac(key, body), m.group(1).decode("ascii"))


def _head_bytes(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("ascii")


def write_head(path: Path, key: bytes, fields: dict) -> None:
    """Rewrite the head in place (no rename: under lockdown ComfyUI may write this file but
    not create files in its folder). A write torn by a crash reads as a damaged head."""
    data = json.dumps({**fields, "mac": _mac(key, _head_bytes(fields))},
                      sort_keys=True).encode("ascii") + b"\n"
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | _BINARY, 0o600)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def read_head(path: Path, key: bytes) -> Optional[dict]:
    """The head's fields when it exists and its MAC holds, else None."""
    try:
        head = json.loads(Path(path).read_bytes())
        fields = {k: head[k] for k in ("count", "first", "last", "rebuilt_at")}
        ok = hmac.compare_digest(_mac(key, _head_bytes(fields)), head["mac"])
        if ok and isinstance(fields["count"], int) and isinstance(fields["first"], int):
            return fields
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _seq_of(raw: Optional[bytes]) -> Optional[int]:
    """The "seq" of a line, or None (no line, a torn line, or a record before anchoring)."""
    if not raw:
        return None
    try:
        seq = json.loads(raw).get("seq")
    except (ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) else None


def _first_seq(files: List[Path]) -> Optional[int]:
    """The number of the oldest anchored record in `files` (oldest first)."""
    for path in files:
        for _, raw in _lines(path):
            seq = _seq_of(raw)
            if seq is not None:
                return seq
    return None


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def _truncate(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass  # the next write starts on a new line (see _append_locked)


def audit_for(policy, home: Union[str, Path]) -> Optional[AuditLog]:
    """The policy's audit log, or None when [audit] enabled = false."""
    if not policy.audit_enabled:
        return None
    return AuditLog(audit_path(policy, home), prompt_mode=policy.audit_prompt,
                    max_bytes=int(policy.audit_max_mb * 2 ** 20), backups=policy.audit_backups)


def audit_path(policy, home: Union[str, Path]) -> Path:
    """[audit] path, else audit.log in the Consent Guard home."""
    if policy.audit_path:
        return Path(policy.audit_path).expanduser()
    return Path(home) / AUDIT_FILENAME


# -- reading --------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(when: Union[str, _dt.datetime], now: Optional[_dt.datetime] = None
               ) -> _dt.datetime:
    """An aware UTC datetime from "30m", "12h", "7d", "2w" (that long ago) or an ISO date or
    time ("2025-01-31", "2025-01-31T18:00", "...Z"); times without a zone are local time."""
    if isinstance(when, _dt.datetime):
        dt = when
    else:
        m = _RELATIVE.match(when)
        if m:
            now = now or _dt.datetime.now(_dt.timezone.utc)
            return now - _dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2).lower()])
        text = when.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = _dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{when!r} is not a time: use an ISO date or time such as "
                             f"2025-01-31 or 2025-01-31T18:00, or a span such as 30m, 12h, "
                             f"7d") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # local time
    return dt.astimezone(_dt.timezone.utc)


class Records:
    """Iterator over records; `skipped` lists (file, line number) of lines that were not
    JSON records (filled as the iteration goes)."""

    def __init__(self, files: List[Path], since, decision, kind):
        self.skipped: List[Tuple[str, int]] = []
        self._it = self._walk(files, since, decision, kind)

    def __iter__(self) -> "Records":
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def _walk(self, files, since, decision, kind) -> Iterator[dict]:
        for path in files:
            for n, raw in _lines(path):
                try:
                    rec = json.loads(raw)
                    if not isinstance(rec, dict):
                        raise ValueError("not an object")
                    at = parse_when(rec["time"]) if since is not None else None
                except (ValueError, KeyError, TypeError):
                    self.skipped.append((str(path), n))
                    continue
                if since is not None and at < since:
                    continue
                if decision is not None and rec.get("decision") != decision:
                    continue
                if kind is not None and rec.get("kind") != kind:
                    continue
                yield rec


def _lines(path: Path) -> Iterator[Tuple[int, bytes]]:
    """(line number, bytes without newline) for every non-empty line; a file that vanished
    (rotated away while reading) is skipped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for n, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if raw:
                yield n, raw


def read_records(path: Union[str, Path], since=None, decision: Optional[str] = None,
                 kind: Optional[str] = None) -> Records:
    """Records from the log and its rotated copies, oldest first, filtered by `since` (an aware
    datetime, or anything parse_when reads), `decision` and `kind`. Lines that are not JSON
    records are skipped and listed in the returned iterator's `skipped`."""
    if since is not None:
        since = parse_when(since)
    return Records(log_files(path), since, decision, kind)


@dataclass
class Verification:
    """What verify_log found: `problems` (tampering or damage: exit 2) and `notes` (what
    the check could not cover, such as lines written before anchoring)."""

    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


@dataclass
class _Walk:
    """State carried from line to line while verifying."""

    before: Optional[Tuple[str, bytes]] = None  # (where, raw) of the previous line
    last_seq: Optional[int] = None
    first: Optional[Tuple[str, int]] = None  # (where, seq) of the oldest anchored record
    last_raw: Optional[bytes] = None  # the newest anchored line
    unanchored: Optional[str] = None  # where the first line before anchoring is


def verify_chain(path: Union[str, Path]) -> List[str]:
    """The problems verify_log finds; [] when the log is intact."""
    return verify_log(path).problems


def verify_log(path: Union[str, Path]) -> Verification:
    """Check the log, its rotated copies and its head (see the module doc, "Anchoring"):
    every line's "prev" is the sha256 of the line before it; every anchored record's MAC
    holds, and its number is one more than the one before; the oldest anchored record is the
    head's "first" and the newest is the head's "count" and "last". Lines written before
    anchoring are only chain-checked, and a note says so."""
    path = Path(path)
    out = Verification()
    key = _verify_key(path, out)
    walk = _Walk()
    with _verify_lock(path):  # so a writer's line and head are seen together
        for file in log_files(path):
            for n, raw in _lines(file):
                _check_line(f"{file}:{n}", raw, key, walk, out)
        head = _head_for_verify(path, key, out)
    if walk.unanchored is not None:
        upto = f"before {walk.first[0]}" if walk.first else "in the whole log"
        out.notes.append(f"lines {upto} (from {walk.unanchored}) are not anchored: they were "
                         f"written before records carried a MAC, so an edit there that "
                         f"re-chains the lines after it would not show")
    _check_ends(path, key, head, walk, out)
    return out


@contextmanager
def _verify_lock(path: Path):
    """The writers' lock when it exists and can be opened (read-only is enough for flock);
    without one, nobody writes with this version, and verifying goes on unlocked."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDONLY | _BINARY)
    except OSError:
        yield
        return
    os.close(fd)
    with _file_lock(lock_path, os.O_RDONLY):
        yield


def _verify_key(path: Path, out: Verification) -> Optional[bytes]:
    kp = key_path_for(path)
    try:
        return read_key(kp)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        out.problems.append(f"cannot use the audit key {kp}: {exc} (run as the admin)")
        return None


def _head_for_verify(path: Path, key: Optional[bytes], out: Verification):
    """The head's fields; "absent", or None when it cannot be trusted (a problem says why)."""
    hp = head_path_for(path)
    if not hp.exists():
        return "absent"
    if key is None:
        return None
    head = read_head(hp, key)
    if head is None:
        out.problems.append(f"{hp}: the head is damaged or its MAC does not match (edited, or "
                            f"written with another key)")
    return head


def _check_line(where: str, raw: bytes, key: Optional[bytes], walk: _Walk,
                out: Verification) -> None:
    issues = []
    try:
        rec = json.loads(raw)
        prev = rec["prev"]
    except (ValueError, KeyError, TypeError):
        out.problems.append(f"{where}: not a record (damaged or edited)")
        walk.before = (where, raw)
        return
    if walk.before is not None and prev != line_digest(walk.before[1]):
        issues.append(f"'prev' does not match the line before it ({walk.before[0]}): that "
                      f"line was edited, or lines between them were removed")
    seq = rec.get("seq")
    if "mac" not in rec:
        if walk.first is not None:
            issues.append("no MAC although records before it have one: written by hand or "
                          "by something that does not hold the audit key")
        elif walk.unanchored is None:
            walk.unanchored = where
    else:
        _check_anchored(where, raw, seq, key, walk, issues)
    if issues:
        out.problems.append(f"{where}: " + "; ".join(issues))
    walk.before = (where, raw)


def _check_anchored(where, raw, seq, key, walk: _Walk, issues: List[str]) -> None:
    if key is not None and not record_mac_ok(key, raw):
        issues.append("its MAC does not match: edited (re-chained or not) without the audit "
                      "key, or written with another key")
    if not isinstance(seq, int):
        issues.append("no record number")
        return
    if walk.last_seq is not None and seq != walk.last_seq + 1:
        if seq > walk.last_seq + 1:
            issues.append(f"record {seq} follows record {walk.last_seq}: "
                          f"{seq - walk.last_seq - 1} record(s) were removed")
        else:
            issues.append(f"record {seq} follows record {walk.last_seq}: repeated or "
                          f"out of order")
    if walk.first is None:
        walk.first = (where, seq)
    walk.last_seq, walk.last_raw = seq, raw


def _check_ends(path: Path, key: Optional[bytes], head, walk: _Walk,
                out: Verification) -> None:
    """Compare the oldest and newest anchored records with the head."""
    hp = head_path_for(path)
    anchored = walk.first is not None
    if anchored and key is None and not any("audit key" in p for p in out.problems):
        out.problems.append(f"no audit key at {key_path_for(path)}: the records' MACs and the "
                            f"head cannot be checked (deleted? run as the admin)")
    if head == "absent":
        if anchored:
            out.problems.append(f"no head file {hp}: the end of the log cannot be checked "
                                f"(the head was deleted)")
        return
    if head is None or key is None:
        return
    if head.get("rebuilt_at") is not None:
        out.problems.append(f"{hp}: the head was missing or damaged and was rebuilt at record "
                            f"{head['rebuilt_at']}: records removed before then cannot be "
                            f"ruled out")
    if not anchored:
        if head["count"]:
            out.problems.append(f"the head says {head['count']} record(s) were written, but "
                                f"the log holds none of them: it was emptied or replaced")
        return
    if walk.first[1] != head["first"]:
        out.problems.append(
            f"{walk.first[0]}: the oldest record is number {walk.first[1]}, but the head says "
            f"the oldest kept is {head['first']}: records were removed from the start")
    if walk.last_seq != head["count"] or line_digest(walk.last_raw) != head["last"]:
        out.problems.append(
            f"the log ends at record {walk.last_seq}, but the head says {head['count']} "
            f"record(s) were written and names another last line: records were removed from "
            f"the end, or the last one was replaced")


__all__ = ["AUDIT_FILENAME", "AuditLog", "Records", "Verification", "audit_for", "audit_path",
           "head_path_for", "image_digest", "key_path_for", "line_digest", "log_files",
           "parse_when", "prompt_digest", "read_records", "verify_chain", "verify_log"]
