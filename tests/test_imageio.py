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


# -- per-file budget: many frames, streamed ------------------------------------------------------

def _many_frame_gif(width, height, frames, tile=8):
    """A valid GIF of `frames` frames on a width x height canvas, each frame a small benign
    coloured tile (written by hand, so the file stays tiny: ~70 bytes a frame). Pillow decodes
    every frame at the full canvas size, which is what makes such a file a bomb."""
    def lzw(pixels, min_code=2):  # a clear code before each literal keeps codes 3 bits wide
        clear, end, size = 1 << min_code, (1 << min_code) + 1, min_code + 1
        codes = [c for p in pixels for c in (clear, p)] + [end]
        bits = nbits = 0
        out = bytearray()
        for c in codes:
            bits |= c << nbits
            nbits += size
            while nbits >= 8:
                out.append(bits & 0xFF)
                bits >>= 8
                nbits -= 8
        out += bytes([bits]) if nbits else b""
        blocks = bytearray([min_code])
        for i in range(0, len(out), 255):
            blocks += bytes([len(out[i:i + 255])]) + out[i:i + 255]
        return bytes(blocks) + b"\x00"

    palette = bytes([255, 255, 255, 30, 60, 200, 200, 120, 40, 0, 0, 0])
    data = bytearray(b"GIF89a" + struct.pack("<HHBBB", width, height, 0xF1, 0, 0) + palette)
    data += b"\x21\xFF\x0BNETSCAPE2.0\x03\x01\x00\x00\x00"
    span = max(1, width - tile)
    for i in range(frames):
        x, y = (i * tile) % span, ((i * tile) // span * tile) % max(1, height - tile)
        data += b"\x21\xF9\x04\x04" + struct.pack("<H", 2) + b"\x00\x00"
        data += b"\x2C" + struct.pack("<HHHHB", x, y, tile, tile, 0)
        data += lzw([1 + i % 3] * (tile * tile))
    return bytes(data + b"\x3B")


def _need_proc():
    import os

    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak memory is read from /proc/self/status (Linux)")


def _run_measured(code: str) -> dict:
    """Run `code` in a fresh Python and return what it prints as JSON plus its peak RSS (MB)
    and wall time, so memory is measured for that work alone."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) across exec
    wrapper = ("import json, sys\n" + code +
               "\nhwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]"
               "\nout['rss_mb'] = int(hwm.split()[1]) / 1024"
               "\nprint(json.dumps(out))\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", wrapper], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return {**json.loads(done.stdout.splitlines()[-1]), "seconds": time.monotonic() - start}


def test_small_gif_of_999_large_frames_is_refused_fast_in_bounded_memory(tmp_path):
    """Issue 12, item 8: 999 frames of 1500x1500 in a small file once took 8 GB and no result
    in 600 s. Now it is refused from its header: 2.2 G pixels in all, over the per-file budget."""
    _need_proc()
    gif = tmp_path / "many.gif"
    gif.write_bytes(_many_frame_gif(1500, 1500, 999))
    assert gif.stat().st_size < 200_000
    out = _run_measured(
        "from consent_guard.imageio import ImageInputError, read_image_frames\n"
        f"out = {{}}\ntry:\n    read_image_frames({str(gif)!r}, {LIMIT})\n"
        "    out['error'] = None\nexcept ImageInputError as exc:\n    out['error'] = str(exc)\n")
    assert out["error"] and "999 frames" in out["error"], out
    assert out["rss_mb"] < 250 and out["seconds"] < 20, out


def test_the_engine_gives_an_error_verdict_for_the_bomb_not_allow(tmp_path):
    from consent_guard.engine import Engine
    from consent_guard.policy import Policy
    from consent_guard.verdict import Decision

    gif = tmp_path / "many.gif"
    gif.write_bytes(_many_frame_gif(1500, 1500, 999))
    verdict = Engine(Policy()).check_file(gif)
    assert verdict.error and verdict.decision is not Decision.ALLOW


def test_frames_together_must_fit_the_pixel_limit(tmp_path):
    gif = tmp_path / "forty.gif"
    gif.write_bytes(_many_frame_gif(500, 500, 40))  # 10 MP in all, 0.25 MP each
    with pytest.raises(ImageInputError, match=r"40 frames of 500x500 = 10 MP in all"):
        read_image_frames(gif, 5_000_000)
    frames, size = read_image_frames(gif, 20_000_000)
    assert len(frames) == 40 and size == (500, 500)
    assert frames[1][0:8, 8:16].tolist() != frames[0][0:8, 8:16].tolist()  # frames differ


def test_too_many_frames_are_refused_not_sampled(tmp_path):
    from consent_guard.imageio import MAX_FRAMES

    gif = tmp_path / "long.gif"
    gif.write_bytes(_many_frame_gif(16, 16, MAX_FRAMES + 1, tile=4))
    with pytest.raises(ImageInputError, match=f"{MAX_FRAMES + 1} frames, over the limit"):
        read_image_frames(gif, LIMIT)
    gif.write_bytes(_many_frame_gif(16, 16, MAX_FRAMES, tile=4))
    assert len(read_image_frames(gif, LIMIT)[0]) == MAX_FRAMES


def test_later_pages_larger_than_the_first_still_count(tmp_path):
    """A multi-page TIFF's pages may each have their own size: the header check sees only the
    first, so pages are counted as they are decoded."""
    tif = tmp_path / "pages.tif"
    Image.new("RGB", (10, 10), (9, 9, 9)).save(
        tif, save_all=True, append_images=[Image.new("RGB", (1200, 1000), (40, 40, 40))])
    with pytest.raises(ImageInputError, match="frames hold over 1 MP in all"):
        read_image_frames(tif, 1_000_000)
    assert [f.shape for f in read_image_frames(tif, 2_000_000)[0]] == [(10, 10, 3),
                                                                      (1000, 1200, 3)]


def test_iter_image_frames_streams_one_frame_at_a_time(tmp_path):
    """Consumed frame by frame, 120 frames of 1000x1000 (360 MB as a list) stay small."""
    _need_proc()
    gif = tmp_path / "stream.gif"
    gif.write_bytes(_many_frame_gif(1000, 1000, 120))
    out = _run_measured(
        "from consent_guard.imageio import iter_image_frames\n"
        f"out = {{'n': 0}}\nfor frame, size in iter_image_frames({str(gif)!r}, 200_000_000):\n"
        "    out['n'] += 1\n    out['size'] = list(size)\n")
    assert out["n"] == 120 and out["size"] == [1000, 1000], out
    assert out["rss_mb"] < 200, out
