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
  prev          sha256 of the previous line's bytes (without its newline), or null for the
                very first line: editing or removing a line breaks the chain (verify_chain)

Writing: each record is one os.write() of one line to a file opened with O_APPEND, under a
thread lock and an OS file lock (fcntl.flock on POSIX, msvcrt.locking on Windows) on
"<log>.lock", so several threads and processes can append; "prev" is read from the file's
actual last line under that lock. No fsync (a decision per generated image must stay cheap; a
power cut can lose the last records, which verify_chain cannot see). record() never raises:
a full disk, a read-only folder or anything else returns False and sets `last_error`; the
adapter decides what that means (in enforce mode: do not save).
"""
from __future__ import annotations

import datetime as _dt
import errno
import getpass
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

from .verdict import Verdict

AUDIT_FILENAME = "audit.log"
KINDS = ("image", "input_image", "prompt")
PROMPT_MODES = ("hash", "text", "none")
LOCK_TIMEOUT_S = 10.0

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
        self.prompt_mode = prompt_mode
        self.max_bytes = max(1, int(max_bytes))
        self.backups = max(1, int(backups))
        self.last_error: Optional[str] = None
        self._logged: Optional[str] = None  # the error last sent to the logger
        self._rotate_error: Optional[str] = None
        self._lock = threading.Lock()
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
                self._append(rec)
        except OSError as exc:
            text = exc.strerror or str(exc)
            code = f" ({errno.errorcode.get(exc.errno, exc.errno)})" if exc.errno else ""
            self._fail(f"audit log {self.path}: cannot write: {text}{code}"
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

    def _fail(self, message: str) -> None:
        self.last_error = message
        if message != self._logged:
            self._logged = message
            try:
                log.error("%s", message)
            except Exception:  # pragma: no cover - a broken handler must not raise here
                pass

    def _append(self, rec: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | _BINARY, 0o600)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            delay = 0.001
            while not _lock(lock_fd):
                if time.monotonic() > deadline:
                    raise OSError(errno.EWOULDBLOCK, f"another process holds {self.lock_path} "
                                                     f"for more than {LOCK_TIMEOUT_S:.0f} s")
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            try:
                self._append_locked(rec)
            finally:
                _unlock(lock_fd)
        finally:
            os.close(lock_fd)

    def _append_locked(self, rec: dict) -> None:
        last = _last_line(self.path)
        if last is None:  # fresh file (first ever, or just rotated): chain to the rotated one
            last = _last_line(self.path.with_name(self.path.name + ".1"))
        rec["prev"] = None if last is None else line_digest(last)
        line = json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        data = line + b"\n"
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.max_bytes:
            try:
                self._rotate()
            except OSError as exc:  # e.g. Windows, a reader holds the file: keep appending
                message = f"audit log {self.path}: cannot rotate: {exc}"
                if message != self._rotate_error:
                    self._rotate_error = message
                    log.warning("%s", message)
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

    def _rotate(self) -> None:
        """audit.log.<backups> is dropped; .k -> .k+1; audit.log -> audit.log.1."""
        name = self.path.name
        oldest = self.path.with_name(f"{name}.{self.backups}")
        if oldest.exists():
            oldest.unlink()
        for k in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{name}.{k}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{name}.{k + 1}"))
        os.replace(self.path, self.path.with_name(f"{name}.1"))


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


def verify_chain(path: Union[str, Path]) -> List[str]:
    """Problems in the hash chain, oldest file first; [] when every line's "prev" is the
    sha256 of the line before it (across rotated files). The first line of the oldest file
    is taken as it is: its predecessor may have been rotated away. Not detectable: lines cut
    from the end of the newest file, the newest file removed as a whole, and whole files
    removed from the oldest end (a local chain has no outside anchor)."""
    problems: List[str] = []
    before: Optional[Tuple[str, int, bytes]] = None
    for path in log_files(path):
        for n, raw in _lines(path):
            where = f"{path}:{n}"
            try:
                rec = json.loads(raw)
                prev = rec["prev"]
            except (ValueError, KeyError, TypeError):
                problems.append(f"{where}: not a record (damaged or edited)")
            else:
                if before is not None and prev != line_digest(before[2]):
                    problems.append(
                        f"{where}: 'prev' does not match the line before it "
                        f"({before[0]}:{before[1]}): that line was edited, or lines between "
                        f"them were removed")
            before = (str(path), n, raw)
    return problems


__all__ = ["AUDIT_FILENAME", "AuditLog", "Records", "audit_for", "audit_path", "image_digest",
           "line_digest", "log_files", "parse_when", "prompt_digest", "read_records",
           "verify_chain"]
