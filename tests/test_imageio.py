"""Odd inputs give a clear per-image error, never a crash."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from consent_guard.imageio import ImageInputError, read_image_frames, to_rgb_uint8

LIMIT = 100_000_000


def test_array_forms_normalise_to_rgb_uint8():
    assert to_rgb_uint8(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    assert to_rgb_uint8(np.zeros((4, 5, 1), np.float32)).shape == (4, 5, 3)
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 200
    assert to_rgb_uint8(rgba)[0, 0].tolist() == [200, 0, 0]  # alpha dropped, not composited
    assert to_rgb_uint8(np.full((2, 2, 3), 65535, np.uint16)).max() == 255
    assert to_rgb_uint8(np.full((2, 2, 3), 1.0, np.float32)).max() == 255


@pytest.mark.parametrize("arr, msg", [
    (np.zeros((2, 2, 2, 3)), "shape"), (np.zeros((0, 4, 3)), "empty"),
    (np.zeros((3, 3, 5)), "channels"), (np.full((3, 3, 3), np.inf), "NaN or infinite"),
])
def test_bad_arrays_are_refused_clearly(arr, msg):
    with pytest.raises(ImageInputError, match=msg):
        to_rgb_uint8(arr)


def _png_header_only(path, width, height):
    """A PNG that claims width x height but holds almost no data (no huge file needed)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_huge_image_is_refused_before_decoding(tmp_path):
    f = tmp_path / "huge.png"
    _png_header_only(f, 20000, 20000)
    with pytest.raises(ImageInputError, match="decompression bomb|too large"):
        read_image_frames(f, LIMIT)


def test_over_policy_limit(tmp_path):
    f = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(f)
    with pytest.raises(ImageInputError, match="too large to check: 300x300"):
        read_image_frames(f, 10_000)


def test_corrupt_truncated_and_missing(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ImageInputError, match="not a readable image"):
        read_image_frames(junk, LIMIT)
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    with pytest.raises(ImageInputError, match="corrupt or truncated"):
        read_image_frames(cut, LIMIT)
    with pytest.raises(ImageInputError, match="not found"):
        read_image_frames(tmp_path / "absent.png", LIMIT)
    with pytest.raises(ImageInputError, match="folder"):
        read_image_frames(tmp_path, LIMIT)


def test_modes_gray_rgba_16bit_palette_and_animation(tmp_path):
    cases = {
        "gray.png": Image.new("L", (10, 8), 77),
        "rgba.png": Image.new("RGBA", (10, 8), (10, 20, 30, 0)),
        "p.gif": Image.new("P", (10, 8), 3),
        "cmyk.jpg": Image.new("CMYK", (10, 8), (0, 0, 0, 0)),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
    g16 = Image.fromarray(np.full((8, 10), 65535, np.uint16))
    g16.save(tmp_path / "g16.png")
    for name in [*cases, "g16.png"]:
        frames, size = read_image_frames(tmp_path / name, LIMIT)
        assert size == (10, 8) and len(frames) == 1 and frames[0].shape == (8, 10, 3) and frames[0].dtype == np.uint8
    assert read_image_frames(tmp_path / "g16.png", LIMIT)[0][0].max() == 255
    assert read_image_frames(tmp_path / "rgba.png", LIMIT)[0][0][0, 0].tolist() == [10, 20, 30]
    anim = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    anim[0].save(tmp_path / "a.gif", save_all=True, append_images=anim[1:], duration=50)
    assert len(read_image_frames(tmp_path / "a.gif", LIMIT)[0]) == 3


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    frames, size = read_image_frames(tmp_path / "r.jpg", LIMIT)
    assert frames[0].shape == (20, 10, 3) and size == (10, 20)


def test_large_jpeg_draft_decode_keeps_the_full_size(tmp_path):
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (1500, 2600, 3), np.uint8)).save(tmp_path / "big.jpg")
    frames, size = read_image_frames(tmp_path / "big.jpg", LIMIT, draft_size=640)
    assert size == (2600, 1500)
    assert 640 <= min(frames[0].shape[:2]) < 1500  # decoded at a reduced scale
    full, _ = read_image_frames(tmp_path / "big.jpg", LIMIT)
    assert full[0].shape == (1500, 2600, 3)
