"""The invisible mark: 32 bits hidden in an image's pixels by RivaGAN, read back after the
changes an image meets when people share it (JPEG, resizing, cropping, mild blur).

Why RivaGAN, and why this way (bench/provenance.py, docs/provenance.md): the encoder and
decoder are the ONNX files that the `invisible-watermark` wheel ships (MIT), run through our
own onnxruntime sessions (models.py, sha256-checked through models/manifest.toml); the wheel is
installed with --no-deps and never imported (its dependencies are torch and opencv-python). The
fragile DWT-DCT method of the same wheel was measured too and loses its bits to a half resize
or a crop, which every sharing site does.

RivaGAN's cost grows with the pixels it sees (about 11 s for a 1 MP image on one CPU core),
so the mark is made on a GRID x GRID copy of the image and only the difference it makes is
scaled back up and added to the full image; the decoder reads a GRID x GRID copy. That keeps
the cost per image fixed whatever its size, and makes the mark indifferent to rescaling: any
size the image is shared at is brought back to the same grid before decoding. The decoder must
read at the grid the encoder used. GRID stays 256: the networks are convolutional, so a smaller
grid is cheaper (192: marking 1.6 times cheaper), but on 30 benign evaluation images the
16-bit id came out right on 22 rather than 26 at 192 (the tag was found as often), and 128 and
160 lost more; the cost is the price of the id (bench/provenance.py, docs/provenance.md).

A centre crop enlarges the mark when the crop is brought back to the grid, so the decoder
also reads the image at 0.9 and 0.8 of the grid (READ_SCALES) and keeps the reading whose tag
matches best: on 15 pictures at grid 192 it turned 5 right ids after an 80% crop into 9, with
no false finds on the unmarked images (for grid 256, see docs/provenance.md). Reading costs
about 2.5 decoder runs at the grid; marking, which every save pays, is unchanged by it.

Channel order: blue, green, red, as the wheel's own code hands OpenCV images to the same
networks. (The wheel's `invisible-watermark -a decode -m rivaGan` runs the decoder on the full
image, where our mark is enlarged about four times; whether it reads our marks is not measured.)

The payload (`payload_bits`): 16 fixed tag bits that say "Consent Guard, payload version 1",
then a 16-bit opaque number (the audit record's number modulo 65536; no names, no user ids).
A mark counts as found when at most MAX_TAG_ERRORS of the 16 tag bits differ: an unmarked
image whose 32 decoded bits were random would pass by chance 137 times in 65,536 (0.2%); what
the decoder gives on real unmarked images is measured in bench/provenance.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .models import ModelError, ModelResolver, onnx_session

ENCODER, DECODER = "rivagan_encoder", "rivagan_decoder"
GRID = 256  # the side of the square copy RivaGAN marks and reads (bench/provenance.py)
# The sides, as fractions of GRID, that the decoder reads an image at: 1.0 for the image as
# marked (or rescaled), 0.9 and 0.8 for a centre crop of that size, whose mark is then back at
# the scale it was made at. The reading with the fewest wrong tag bits wins.
READ_SCALES = (1.0, 0.9, 0.8)
BITS = 32
TAG = "1001011000111010"  # 16 bits, 8 ones: far from the all-ones flat images decode to
MAX_TAG_ERRORS = 2
ID_BITS = BITS - len(TAG)


class WatermarkError(RuntimeError):
    """The mark cannot be made or read (a model missing or failing); the message says why."""


@dataclass(frozen=True)
class Reading:
    """What the decoder read from an image."""
    found: bool
    tag_errors: int  # of the 16 tag bits, how many differ
    bit_confidence: float  # mean over the 32 bits of the decoder's probability for its bit
    bits: str  # the 32 bits read, "0"/"1"
    mark_id: Optional[int]  # the 16-bit number, when found

    def to_dict(self) -> dict:
        return {"found": self.found, "tag_bits_matching": f"{len(TAG) - self.tag_errors}/"
                f"{len(TAG)}", "bit_confidence": round(self.bit_confidence, 3),
                "payload": f"{int(self.bits, 2):08x}", "mark_id": self.mark_id}


def payload_bits(mark_id: int) -> str:
    """The 32 bits for a mark: the tag, then `mark_id` modulo 2**16, most significant first."""
    return TAG + format(int(mark_id) % (1 << ID_BITS), f"0{ID_BITS}b")


def read_payload(bits: str) -> Reading:
    """Interprets 32 decoded bits (no confidence: 1.0)."""
    return _reading(bits, 1.0)


def _reading(bits: str, confidence: float) -> Reading:
    errors = sum(a != b for a, b in zip(bits[:len(TAG)], TAG))
    found = errors <= MAX_TAG_ERRORS
    return Reading(found, errors, confidence, bits,
                   int(bits[len(TAG):], 2) if found else None)


def _to_network(bgr_small: np.ndarray) -> np.ndarray:
    """uint8 [side, side, 3] -> float32 [1, 3, 1, side, side] in [-1, 1] (one-frame video)."""
    x = bgr_small.astype(np.float32) / 127.5 - 1.0
    return x.transpose(2, 0, 1)[None, :, None]


def _grid_copy(rgb: np.ndarray, side: int = GRID) -> np.ndarray:
    """The side x side copy, channels in BGR order."""
    small = np.asarray(Image.fromarray(rgb).resize((side, side), Image.BILINEAR))
    return np.ascontiguousarray(small[..., ::-1])


def _upscale(residual: np.ndarray, width: int, height: int) -> np.ndarray:
    """A float [grid, grid, 3] difference scaled to the image's size, one channel at a time."""
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(residual[..., c]), "F")
                         .resize((width, height), Image.BILINEAR)) for c in range(3)]
    return np.stack(planes, axis=-1)


def _rgb_uint8(pixels) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise WatermarkError(f"the mark needs RGB uint8 pixels [H, W, 3], got {arr.dtype} "
                             f"{arr.shape}")
    return arr


class Marker:
    """Embeds and reads the mark with the two RivaGAN models (loaded on first use)."""

    def __init__(self, resolver: Optional[ModelResolver] = None, device: str = "auto",
                 grid: int = GRID, read_scales: Sequence[float] = READ_SCALES):
        self.resolver = resolver or ModelResolver()
        self.device = device
        self.grid = grid  # the encoder's and decoder's grid must be the same
        self.read_scales = tuple(read_scales)

    def _session(self, name: str):
        try:
            return onnx_session(self.resolver.resolve(name), self.device)
        except ModelError as exc:
            raise WatermarkError(f"the watermark model cannot be used: {exc}") from exc

    def embed(self, pixels: np.ndarray, bits: str) -> np.ndarray:
        """A marked copy of `pixels` (RGB uint8) carrying `bits` (32 of "0"/"1"). Not read
        back: on about 1 picture in 9 a bit or two of the id do not take (bench/provenance.py);
        reading back and adding the mark more strongly fixed only 2 of 30 pictures for 3.4
        times the cost on a CPU, and the tag, which says "Consent Guard", still reads."""
        rgb = _rgb_uint8(pixels)
        if len(bits) != BITS or set(bits) - {"0", "1"}:
            raise WatermarkError(f"a mark carries {BITS} bits, got {bits!r}")
        h, w = rgb.shape[:2]
        marked = rgb.astype(np.float32) + _upscale(self._residual(rgb, bits), w, h)
        return np.clip(np.rint(marked), 0, 255).astype(np.uint8)

    def _residual(self, rgb: np.ndarray, bits: str) -> np.ndarray:
        """What RivaGAN changes in the grid copy, float, RGB order."""
        small = _grid_copy(rgb, self.grid)
        data = np.array([[float(b) for b in bits]], np.float32)
        try:
            out = self._session(ENCODER).run(None, {"frame": _to_network(small), "data": data})[0]
        except WatermarkError:
            raise
        except Exception as exc:  # onnxruntime raises its own types
            raise WatermarkError(f"the watermark encoder failed: {exc}") from exc
        marked_small = (np.clip(out[0, :, 0].transpose(1, 2, 0), -1.0, 1.0) + 1.0) * 127.5
        return np.ascontiguousarray((marked_small - small.astype(np.float32))[..., ::-1])

    def read(self, pixels: np.ndarray) -> Reading:
        """What the decoder reads from `pixels` (RGB uint8, any size): of the readings at each
        of `read_scales`, the one with the fewest wrong tag bits, then the most confident.
        Taking the best of three lets a cropped image be read at its mark's own scale; on
        unmarked images it raised no false finds (bench/provenance.py)."""
        rgb = _rgb_uint8(pixels)
        readings = [self._read_at(rgb, max(8, round(self.grid * s))) for s in self.read_scales]
        return min(readings, key=lambda r: (r.tag_errors, -r.bit_confidence))

    def _read_at(self, rgb: np.ndarray, side: int) -> Reading:
        try:
            logits = self._session(DECODER).run(
                None, {"frame": _to_network(_grid_copy(rgb, side))})[0][0]
        except WatermarkError:
            raise
        except Exception as exc:
            raise WatermarkError(f"the watermark decoder failed: {exc}") from exc
        logits = np.asarray(logits, np.float64)
        bits = "".join("1" if v > 0 else "0" for v in logits)
        confidence = float(np.mean(1.0 / (1.0 + np.exp(-np.abs(logits)))))
        return _reading(bits, confidence)


def model_names() -> Sequence[str]:
    return (ENCODER, DECODER)
