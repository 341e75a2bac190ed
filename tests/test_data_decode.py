"""decode_image on every kind of awkward input, the canvas, and the SkipLog (no TensorFlow)."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dino_jax.data.decode import (
    BadImage,
    SkipLog,
    decode_image,
    fit_size,
    reason_kind,
    to_canvas,
)

RNG = np.random.default_rng(0)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (greyscale (h, w) or RGB (h, w, 3)); PIL cannot write 48-bit RGB itself."""
    height, width = array.shape[:2]
    colour = 2 if array.ndim == 3 else 0
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def huge_png_header(side: int = 20_000) -> bytes:
    """A PNG that claims side x side pixels and holds almost no data."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + idat


def rgb_array(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), np.uint8)


def test_fit_size_keeps_aspect_and_only_shrinks():
    assert fit_size(375, 500, 256) == (192, 256)
    assert fit_size(500, 375, 256) == (256, 192)
    assert fit_size(100, 50, 256) == (100, 50)
    assert fit_size(10_000, 1, 64) == (64, 1)


def test_rgb_png_is_lossless_and_canvas_is_top_left_zero_padded():
    array = rgb_array(20, 30)
    out = decode_image(encode(Image.fromarray(array), "PNG"), 64)
    np.testing.assert_array_equal(out, array)
    canvas, size = to_canvas(out, 64)
    assert canvas.shape == (64, 64, 3) and canvas.dtype == np.uint8
    assert size.tolist() == [20, 30] and size.dtype == np.int32
    np.testing.assert_array_equal(canvas[:20, :30], array)
    assert not canvas[20:].any() and not canvas[:, 30:].any()


@pytest.mark.parametrize("fmt", ["WEBP", "BMP"])
def test_other_formats(fmt):
    array = rgb_array(12, 9)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    np.testing.assert_array_equal(
        decode_image(encode(Image.fromarray(array), fmt, **kw), 32), array
    )


def test_greyscale_rgba_and_palette_become_rgb_like_pil_convert():
    grey = RNG.integers(0, 256, (10, 12), np.uint8)
    out = decode_image(encode(Image.fromarray(grey), "PNG"), 32)
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))

    rgba = RNG.integers(0, 256, (10, 12, 4), np.uint8)
    out = decode_image(encode(Image.fromarray(rgba), "PNG"), 32)
    np.testing.assert_array_equal(out, rgba[..., :3])  # alpha dropped, as the official loader

    palette = Image.fromarray(grey).convert("P")
    data = encode(palette, "PNG", transparency=0)
    np.testing.assert_array_equal(decode_image(data, 32), np.asarray(palette.convert("RGB")))


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 12), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(cmyk, "JPEG", quality=95), 32)
    assert out.shape == (12, 16, 3)
    red, green, blue = out.reshape(-1, 3).mean(0)
    assert red > 200 and green < 60 and blue < 60


def test_16_bit_pngs_are_rescaled_not_clipped():
    grey = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000).astype(np.uint16)
    out = decode_image(png16(grey), 32)
    np.testing.assert_array_equal(out[..., 0], (grey >> 8).astype(np.uint8))
    assert out.max() > 200 and len(np.unique(out)) > 10  # clipping would give mostly 255

    rgb = (RNG.integers(0, 65536, (4, 5, 3))).astype(np.uint16)
    np.testing.assert_array_equal(decode_image(png16(rgb), 32), (rgb >> 8).astype(np.uint8))


def test_small_images_are_kept_as_they_are():
    array = rgb_array(3, 2)
    out = decode_image(encode(Image.fromarray(array), "PNG"), 224)
    np.testing.assert_array_equal(out, array)


def test_large_images_are_downscaled_once_with_antialiasing():
    stripes = np.zeros((300, 400, 3), np.uint8)
    stripes[:, ::2] = 255  # 1-pixel stripes: point sampling would give 0 or 255
    out = decode_image(encode(Image.fromarray(stripes), "PNG"), 100)
    assert out.shape == (75, 100, 3)
    assert abs(float(out[5:-5, 5:-5].mean()) - 127.5) < 3 and out[5:-5, 5:-5].std() < 6


def test_large_jpeg_uses_reduced_decoding_and_matches_the_full_path():
    smooth = np.linspace(0, 255, 1600, dtype=np.float32)
    array = np.stack(np.broadcast_arrays(smooth[None, :], smooth[:1200, None], 128.0), -1)
    data = encode(Image.fromarray(array.astype(np.uint8)), "JPEG", quality=95)
    out = decode_image(data, 200)
    assert out.shape == (150, 200, 3)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((200, 150), Image.Resampling.BICUBIC)
    assert np.abs(out.astype(int) - np.asarray(full)).mean() < 2.0


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "empty file"),
        (b"this is a text file, not a JPEG\n", "not an image"),
        (huge_png_header(), "too large"),
    ],
    ids=["zero-byte", "text", "huge-header"],
)
def test_refused_inputs(data, kind):
    with pytest.raises(BadImage) as info:
        decode_image(data, 64)
    assert reason_kind(info.value.reason) == kind


def test_huge_header_is_refused_before_any_pixel_is_allocated():
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(BadImage, match="too large"):
        decode_image(huge_png_header(), 64)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 10_000_000  # 20,000^2 RGB would be 1.2 GB


def test_truncated_and_corrupt_files():
    data = encode(Image.fromarray(rgb_array(64, 64)), "JPEG")
    with pytest.raises(BadImage, match=r"^corrupt"):
        decode_image(data[: len(data) // 2], 64)
    png = bytearray(encode(Image.fromarray(rgb_array(64, 64)), "PNG"))
    png[len(png) // 2 : len(png) // 2 + 64] = b"\xff" * 64
    with pytest.raises(BadImage, match=r"^corrupt"):
        decode_image(bytes(png), 64)


def test_skip_log_counts_distinct_inputs_and_appends_to_its_file(tmp_path):
    log = SkipLog(tmp_path / "skipped.tsv")
    log.add("a.jpg", "corrupt: OSError: truncated")
    log.add("b.png", "too large: 20000x20000")
    log.add("a.jpg", "corrupt: OSError: truncated")  # met again in a later epoch
    assert log.count == 2 and log.events == 3
    assert log.entries() == [
        ("a.jpg", "corrupt: OSError: truncated"),
        ("b.png", "too large: 20000x20000"),
    ]
    assert log.entries(1) == [("b.png", "too large: 20000x20000")]
    assert log.summary() == {"corrupt": 1, "too large": 1}
    lines = (tmp_path / "skipped.tsv").read_text().splitlines()
    assert lines == ["a.jpg\tcorrupt: OSError: truncated", "b.png\ttoo large: 20000x20000"]
