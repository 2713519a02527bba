"""Provenance: the invisible mark and the signed verdict that every saved image carries, and
checking both in a file (`consent-guard verify`). Every UI adapter calls stamp() on the pixels
the engine let through (after Engine.render), then writes them with the metadata it returns;
nothing here decides anything, and a blocked image never reaches this module.

The signed verdict ("consent_guard_provenance", a PNG text chunk; in other formats where the
adapter writes metadata) is JSON: {"claim": ..., "signature": base64, "public_key": base64}.
The claim is canonical JSON (sorted keys, no spaces, ASCII) of: the verdict summary that the
"consent_guard" chunk also holds, the audit record's number on this machine, the sha256 of the
image's decoded RGB pixels as saved (so the metadata can sit in the same file, and re-saving
the same pixels with other metadata keeps it valid), the mark's payload, the time, and the
public key's fingerprint. The signature is Ed25519 under the machine key, a file kept like the
audit key (`<home>/provenance.key`, created on first use with mode 0600). The public key rides
in the metadata, so any machine can tell whether the file was edited since it was signed; only
this machine can say the key is its own: the signature is self-signed, not a certificate.

A saver that writes several images with the same metadata (ComfyUI's stock SaveImage takes one
extra_pnginfo for its whole batch) stores a list of signed claims; verify picks the one whose
pixel hash is the file's.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import io
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .verdict import Decision, Verdict

KEY_FILENAME = "provenance.key"
KEY_MAGIC = "consent-guard-provenance-key-v1"
METADATA_KEY = "consent_guard_provenance"
VERDICT_KEY = "consent_guard"
CLAIM_VERSION = 1


class ProvenanceError(RuntimeError):
    """The mark or the signature cannot be made; nothing should be saved (fail closed)."""


# -- the machine key ----------------------------------------------------------------------------

def key_path(home: Union[str, Path]) -> Path:
    return Path(home) / KEY_FILENAME


def _create_key(path: Path) -> None:
    """A new Ed25519 key, written with O_EXCL so two first writers cannot each make one."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption,
                                                              PrivateFormat)

    seed = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                      NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w", encoding="ascii") as fp:
        fp.write(f"{KEY_MAGIC} {base64.b64encode(seed).decode('ascii')}\n")


def read_key(path: Path):
    """The Ed25519 private key in `path`; ProvenanceError says why it cannot be used."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        parts = Path(path).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProvenanceError(f"cannot read the provenance key {path}: {exc}") from None
    try:
        if len(parts) != 2 or parts[0] != KEY_MAGIC:
            raise ValueError("not a provenance key file")
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(parts[1]))
    except ValueError as exc:
        raise ProvenanceError(f"{path} is damaged ({exc}): move it away and a new key is made "
                              f"(files signed before then stay checkable, but no longer read "
                              f"as signed by this machine)") from None


def machine_key(home: Union[str, Path], create: bool = True):
    """This machine's signing key, made on first use when `create`; None when absent."""
    path = key_path(home)
    if not path.exists():
        if not create:
            return None
        try:
            _create_key(path)
        except OSError as exc:
            raise ProvenanceError(
                f"cannot create the provenance key {path}: {exc.strerror or exc}. Run "
                f"`consent-guard verify --make-key` once as the account that owns the Consent "
                f"Guard home, or set [provenance] sign = false") from None
    return _cached_key(path)


_keys: Dict[str, Tuple[Tuple[int, int, int], object]] = {}


def _cached_key(path: Path):
    """read_key once per file version (size, mtime, inode): every saved image is signed, and
    re-reading the file for each would be I/O on the save path; a replaced key is read anew."""
    try:
        st = path.stat()
    except OSError:
        return read_key(path)  # raises ProvenanceError with the reason
    version = (st.st_size, st.st_mtime_ns, st.st_ino)
    cached = _keys.get(str(path))
    if cached is None or cached[0] != version:
        cached = (version, read_key(path))
        _keys[str(path)] = cached
    return cached[1]


def public_bytes(private_key) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def fingerprint(public_key: bytes) -> str:
    """A short name for a public key: "ed25519:" and 16 hex digits of its sha256."""
    return "ed25519:" + hashlib.sha256(public_key).hexdigest()[:16]


# -- claims ---------------------------------------------------------------------------------------

def pixels_sha256(pixels: np.ndarray) -> str:
    """sha256 of RGB uint8 pixels with their shape, as a decoder gives them back."""
    arr = np.ascontiguousarray(np.asarray(pixels, dtype=np.uint8))
    h = hashlib.sha256(f"{arr.shape[0]}x{arr.shape[1]}x{arr.shape[2]}:".encode("ascii"))
    h.update(arr.tobytes())
    return h.hexdigest()


def verdict_summary(verdict: Verdict) -> dict:
    """What the "consent_guard" metadata chunk holds: decision, reasons (label, score), rule."""
    return {"decision": verdict.decision.value,
            "reasons": [{"label": r.label, "score": round(r.score, 3)} for r in verdict.reasons],
            "rule": verdict.rule}


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _now() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def make_claim(summary: dict, pixels: np.ndarray, record_id: Optional[int],
               payload: Optional[str], key_fp: str) -> dict:
    return {"v": CLAIM_VERSION, "generator": "Consent Guard", "verdict": summary,
            "audit_record": record_id, "pixels_sha256": pixels_sha256(pixels),
            "watermark": payload, "time": _now(), "key": key_fp}


def sign_claim(claim: dict, private_key) -> dict:
    public = public_bytes(private_key)
    return {"claim": claim,
            "signature": base64.b64encode(private_key.sign(canonical(claim))).decode("ascii"),
            "public_key": base64.b64encode(public).decode("ascii")}


# -- stamping -------------------------------------------------------------------------------------

@dataclass
class Stamp:
    """Pixels to write and the metadata text to write with them."""
    pixels: np.ndarray
    summary: dict
    signed: Optional[dict] = None  # sign_claim()'s value, when signing is on
    payload: Optional[str] = None  # the mark's 32 bits as 8 hex digits, when marked
    record_id: Optional[int] = None

    def text_chunks(self) -> Dict[str, str]:
        """{chunk name: text}: the verdict, and the signed claim when there is one."""
        out = {VERDICT_KEY: json.dumps(self.summary)}
        if self.signed is not None:
            out[METADATA_KEY] = json.dumps(self.signed)
        return out


_markers: Dict[Tuple, object] = {}
_markers_lock = threading.Lock()


def marker_for(policy, model_dirs: Sequence[Path] = ()):
    """A watermark.Marker for the policy's model paths and device, made once per process."""
    from .models import ModelResolver
    from .watermark import Marker

    key = (tuple(sorted(policy.model_paths.items())), tuple(str(d) for d in model_dirs),
           policy.device)
    with _markers_lock:
        if key not in _markers:
            resolver = ModelResolver(dict(policy.model_paths), search_dirs=list(model_dirs))
            _markers[key] = Marker(resolver, policy.device)
        return _markers[key]


def stamp(pixels: np.ndarray, verdict: Verdict, *, policy, home: Union[str, Path],
          record_id: Optional[int] = None, model_dirs: Sequence[Path] = (),
          marker=None) -> Stamp:
    """The mark and the signed verdict for pixels the engine let through (RGB uint8), as the
    policy's [provenance] asks. Raises ProvenanceError when asked for and impossible: the
    adapter then does not save (fail closed). `record_id`: the number of the image's audit
    record (AuditLog.append), or None when there is no audit log."""
    from .watermark import WatermarkError, payload_bits

    if verdict.error or verdict.decision is Decision.BLOCK:
        raise ProvenanceError("a blocked image is never stamped or saved")
    out, payload = np.asarray(pixels), None
    if policy.watermark_on:
        bits = payload_bits(record_id or 0)
        try:
            out = (marker or marker_for(policy, model_dirs)).embed(out, bits)
        except WatermarkError as exc:
            raise ProvenanceError(f"the invisible mark could not be made, so the image is not "
                                  f"saved: {exc}") from exc
        payload = f"{int(bits, 2):08x}"
    result = Stamp(out, verdict_summary(verdict), payload=payload, record_id=record_id)
    if policy.sign_on:
        key = machine_key(home)
        claim = make_claim(result.summary, out, record_id, payload,
                           fingerprint(public_bytes(key)))
        result.signed = sign_claim(claim, key)
    return result


def stamp_batch(frames: Sequence[np.ndarray], verdicts: Sequence[Verdict],
                record_ids: Sequence[Optional[int]], **kw) -> List[Stamp]:
    return [stamp(f, v, record_id=r, **kw) for f, v, r in zip(frames, verdicts, record_ids)]


def batch_metadata(stamps: Sequence[Stamp]) -> Optional[List[dict]]:
    """The signed claims of a batch written with one metadata (stock SaveImage), or None."""
    signed = [s.signed for s in stamps if s.signed is not None]
    return signed or None


def enabled(policy) -> bool:
    return bool(policy.watermark_on or policy.sign_on)


# -- verifying -------------------------------------------------------------------------------------

@dataclass
class SignatureCheck:
    status: str  # "valid", "invalid" or "absent"
    problem: Optional[str] = None
    claim: Optional[dict] = None
    key: Optional[str] = None  # the signer's fingerprint
    this_machine: Optional[bool] = None  # signed with this machine's key (None: unknown)

    def to_dict(self) -> dict:
        return {"status": self.status, "problem": self.problem, "key": self.key,
                "signed_by_this_machine": self.this_machine, "claim": self.claim}


def _candidates(text: Optional[str]) -> List[dict]:
    """The signed claims in a metadata text: one object, or a list (a batch)."""
    if not text:
        return []
    data = json.loads(text)
    items = data if isinstance(data, list) else [data]
    if not all(isinstance(i, dict) for i in items):
        raise ValueError("not a signed claim")
    return items


def _signature_ok(item: dict) -> Tuple[bool, str]:
    """Whether the Ed25519 signature over the claim holds under the key that came with it."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        public = base64.b64decode(item["public_key"], validate=True)
        signature = base64.b64decode(item["signature"], validate=True)
        claim = item["claim"]
        Ed25519PublicKey.from_public_bytes(public).verify(signature, canonical(claim))
    except InvalidSignature:
        return False, "the signature does not match the claim: the signed text was edited"
    except (KeyError, TypeError, ValueError) as exc:
        return False, f"the signed text is damaged ({type(exc).__name__}: {exc})"
    if claim.get("key") != fingerprint(public):
        return False, "the claim names another key than the one that signed it"
    return True, ""


def check_signature(metadata: Dict[str, str], pixels: np.ndarray,
                    home: Optional[Union[str, Path]] = None) -> SignatureCheck:
    """Checks the signed claim in a file's metadata against its decoded pixels (RGB uint8)
    and its "consent_guard" verdict text; says whether this machine's key signed it."""
    try:
        items = _candidates(metadata.get(METADATA_KEY))
    except ValueError as exc:
        return SignatureCheck("invalid", f"the signed text is not readable JSON: {exc}")
    if not items:
        return SignatureCheck("absent", "no signed verdict in this file's metadata")
    digest = pixels_sha256(pixels)
    matching = [i for i in items if isinstance(i.get("claim"), dict)
                and i["claim"].get("pixels_sha256") == digest]
    if not matching:
        return SignatureCheck("invalid", "the pixels differ from the ones that were signed "
                              "(the image was edited or re-encoded)",
                              claim=items[0].get("claim") if len(items) == 1 else None)
    item = matching[0]
    ok, problem = _signature_ok(item)
    claim = item["claim"]
    if not ok:
        return SignatureCheck("invalid", problem, claim=claim)
    result = SignatureCheck("valid", None, claim=claim, key=claim.get("key"),
                            this_machine=_is_this_machine(claim.get("key"), home))
    problem = _verdict_text_problem(metadata.get(VERDICT_KEY), claim)
    if problem:
        result.status, result.problem = "invalid", problem
    return result


def _verdict_text_problem(text: Optional[str], claim: dict) -> Optional[str]:
    """The plain verdict text must say what the signed claim says."""
    if text is None:
        return None
    try:
        shown = json.loads(text)
    except ValueError:
        return "the consent_guard verdict text is not JSON any more: it was edited"
    if canonical(shown) != canonical(claim.get("verdict")):
        return "the consent_guard verdict text differs from the signed one: it was edited"
    return None


def _is_this_machine(key_fp: Optional[str], home) -> Optional[bool]:
    if home is None:
        return None
    try:
        key = machine_key(home, create=False)
    except ProvenanceError:
        return None
    if key is None:
        return False
    return fingerprint(public_bytes(key)) == key_fp


def read_metadata(image) -> Dict[str, str]:
    """Text metadata of an opened PIL image: PNG text chunks, and for JPEG / WebP a JSON
    object in the EXIF UserComment or ImageDescription that holds our keys."""
    out = {k: v for k, v in (getattr(image, "text", None) or image.info or {}).items()
           if isinstance(v, str)}
    if METADATA_KEY in out:
        return out
    try:
        exif = image.getexif()
        values = [exif.get(0x010E)]  # ImageDescription
        values.append(exif.get_ifd(0x8769).get(0x9286))  # UserComment
    except Exception:
        return out
    for value in values:
        text = _exif_text(value)
        if text and METADATA_KEY in text:
            try:
                data = json.loads(text[text.index("{"):])
            except ValueError:
                continue
            if isinstance(data, dict):
                out.update({k: v if isinstance(v, str) else json.dumps(v)
                            for k, v in data.items() if k in (METADATA_KEY, VERDICT_KEY)})
    return out


def _exif_text(value) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):  # UserComment: 8 bytes of charset, then the text
        body = value[8:] if value[:8] in (b"UNICODE\x00", b"ASCII\x00\x00\x00") else value
        for enc in (("utf-16-be", "utf-16-le") if value[:8] == b"UNICODE\x00" else ("utf-8",)):
            try:
                return body.decode(enc)
            except UnicodeDecodeError:
                continue
    return None


@dataclass
class FileCheck:
    path: str
    watermark: Optional[dict] = None
    signature: Optional[SignatureCheck] = None
    record: Optional[dict] = None
    error: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": self.path, "error": self.error, "watermark": self.watermark,
                "signature": self.signature.to_dict() if self.signature else None,
                "record": self.record, "notes": self.notes}


def verify_file(path: Union[str, Path, io.BytesIO], *, home: Optional[Union[str, Path]] = None,
                marker=None, name: Optional[str] = None,
                max_pixels: int = 100_000_000) -> FileCheck:
    """The mark and the signature of one image file (a path, or the file's bytes in a
    BytesIO, named `name`). `marker`: a watermark.Marker (None: read the mark with the
    installed models; a model that cannot load is reported, not raised)."""
    from PIL import Image

    from .watermark import Marker, WatermarkError

    result = FileCheck(name or str(path))
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"{im.width} x {im.height} is larger than the policy's "
                                 f"[limits] max_pixels")
            metadata = read_metadata(im)
            pixels = np.asarray(im.convert("RGB"))
    except Exception as exc:  # Pillow raises many types for a file it cannot read
        result.error = f"cannot read the image: {exc}"
        return result
    result.signature = check_signature(metadata, pixels, home)
    try:
        result.watermark = (marker or Marker()).read(pixels).to_dict()
    except WatermarkError as exc:
        result.notes.append(f"the mark could not be read: {exc}")
    return result


def find_record(audit_file: Union[str, Path], record_id: int, mark_id: bool = False
                ) -> List[dict]:
    """The audit records with number `record_id`, or, when `mark_id`, those whose number
    modulo 2**16 is it (the mark carries only 16 bits of the number)."""
    from .audit import read_records

    found = []
    for rec in read_records(audit_file):
        seq = rec.get("seq")
        if isinstance(seq, int) and (seq % (1 << 16) == record_id if mark_id
                                     else seq == record_id):
            found.append(rec)
    return found


def record_for(check: FileCheck, audit_file: Union[str, Path]) -> dict:
    """The audit record a checked file points to: by the signed number when this machine
    signed it; else by the mark's 16 bits (every record with that number modulo 65536)."""
    sig = check.signature
    if sig is not None and sig.status == "valid":
        if not sig.this_machine:
            return {"found": False, "why": "signed by another machine's key"}
        number = (sig.claim or {}).get("audit_record")
        if not isinstance(number, int):
            return {"found": False, "why": "the signed verdict names no audit record"}
        records = find_record(audit_file, number)
        return {"found": bool(records), "by": "signature", "records": records}
    if check.watermark and check.watermark.get("found"):
        records = find_record(audit_file, check.watermark["mark_id"], mark_id=True)
        return {"found": bool(records), "by": "mark (16 bits: every record with that number "
                                              "modulo 65536)", "records": records}
    return {"found": False, "why": "neither a valid signature nor a mark points to one"}
