"""decode_image on every kind of awkward input, the bounds on what one input may cost, the canvas,
and the SkipLog with its file format (no TensorFlow)."""

import gzip
import io
import os
import struct
import threading
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from dino_jax.data import decode
from dino_jax.data.decode import (
    SKIP_LOG_HEADER,
    BadImage,
    SkipLog,
    byte_limit,
    decode_image,
    escape_field,
    fit_size,
    pixel_limit,
    read_file,
    reason_kind,
    to_canvas,
    unescape_field,
)
from dino_jax.data.sources import DataError
from dino_jax.data.sources.demo import read_idx

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
    assert lines == [
        SKIP_LOG_HEADER,
        "a.jpg\tcorrupt: OSError: truncated",
        "b.png\ttoo large: 20000x20000",
    ]


# ----------------------------------------------------------------------------- bounds


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of width x height, compressed row by row: a few KB for
    10^8 pixels, which decode to hundreds of MB."""
    row = b"\0" + bytes((width + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = png_chunk(b"IDAT", body)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + idat + png_chunk(b"IEND", b"")


class PixelsLoaded(BaseException):  # not an Exception: decode_image lets it through
    pass


@pytest.fixture
def no_pixel_loading(monkeypatch):
    """Image loading (decoding pixels into memory) stopped with PixelsLoaded(width, height)."""

    def load(self):
        raise PixelsLoaded(*self.size)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_pixel_limit_follows_the_canvas():
    assert pixel_limit(28) == pixel_limit(512) == 4096 * 4096
    assert pixel_limit(1024) == 64 * 1024 * 1024
    assert byte_limit(512) == 4 * 4096 * 4096 + (1 << 20)


def test_a_small_file_of_many_pixels_is_refused_from_its_header(tally, no_pixel_loading):
    data = bilevel_png(9400, 9400)  # the red team's bomb: 88 M pixels, under PIL's own limit
    assert len(data) < 40_000
    with tally.bad_input(), pytest.raises(BadImage, match=r"^too large: 9400x9400 pixels"):
        decode_image(data, 512)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_limit_applies_after_reduced_jpeg_decoding(no_pixel_loading):
    huge = b"\xff\xd8" + struct.pack(">HHBHHB", 0xFFC0, 17, 8, 12_000, 12_000, 3)
    huge += b"\x01\x11\x00\x02\x11\x00\x03\x11\x00" + b"\xff\xda" + bytes(12) + b"\xff\xd9"
    # 144 M pixels stored, decoded at 1/8 scale (1500 x 1500) for a 512 canvas: within bounds.
    with pytest.raises(PixelsLoaded) as loaded:
        decode_image(huge, 512)
    assert loaded.value.args == (1500, 1500)
    with pytest.raises(BadImage, match=r"too large: 12000x12000 pixels to decode"):
        decode_image(bilevel_png(12_000, 12_000), 512)  # a PNG has no reduced decoding


def test_encoded_bytes_beyond_the_limit_are_refused_unread(tmp_path, tally, monkeypatch):
    monkeypatch.setattr(decode, "MIN_PIXEL_LIMIT", 1000)
    monkeypatch.setattr(decode, "HEADER_BYTES", 0)
    limit = byte_limit(2)  # 4,000 bytes
    with tally.bad_input(), pytest.raises(BadImage, match=r"^too large: 4,001 bytes"):
        decode_image(bytes(limit + 1), 2)  # a TFDS record

    sparse = tmp_path / "huge.jpg"  # a 3 GB ".jpg", sparse: nothing to allocate on disk
    with open(sparse, "wb") as f:
        f.truncate(3 << 30)
    with tally.bad_input(), pytest.raises(BadImage, match=r"^too large: file of 3,221,225,472"):
        read_file(str(sparse), 64 << 20)


def _read_in_thread(path: str) -> BaseException | bytes | None:
    """read_file(path) on a thread, given 20 s: None if it is still blocked then."""
    out: list = []

    def run():
        try:
            out.append(read_file(path, 1 << 20))
        except BaseException as e:
            out.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    return out[0] if out else None


def test_files_swapped_after_the_listing_are_refused_without_blocking(tmp_path, tally):
    os.mkfifo(tmp_path / "fifo.jpg")  # opened plainly, a FIFO blocks its reader forever
    os.symlink("/dev/zero", tmp_path / "zero.jpg")  # read plainly, endless
    for name in ("fifo.jpg", "zero.jpg"):
        with tally.bad_input():
            outcome = _read_in_thread(str(tmp_path / name))
            assert isinstance(outcome, BadImage), (name, outcome)
            assert outcome.reason == "not a regular file"


# ----------------------------------------------------------------------------- skip log format

HOSTILE_NAMES = [
    os.fsdecode(b"/data/bad\xff\xfe name.jpg"),  # not UTF-8
    "/data/tab\tnew\nline\rcarriage.png",
    "/data/back\\slash \\t \\x41 \\u0041 \\\\.jpg",  # text that looks like escapes
    "/data/control \x01\x1b\x7f.jpg",
    "/data/separators \u2028 \x85 \x1c \u00a0 \u200b.jpg",  # line breaks to str.splitlines
    "/data/ünïcödé 猫 🐈.jpg",
    "/data/lone \udc80 \ud800 surrogates.jpg",  # not a file name, but a str all the same
    "/data/# looks like the header.jpg",
]


def test_any_name_is_logged_on_one_line_and_read_back_exactly(tmp_path, tally):
    path = tmp_path / "skipped.tsv"
    log = SkipLog(path)
    for i, name in enumerate(HOSTILE_NAMES):
        log.add(name, f"corrupt: reason {i} with\ta tab and {name}")
    raw = path.read_bytes()
    lines = raw.decode("utf-8").splitlines()  # strict: the file is valid UTF-8
    assert len(lines) == raw.count(b"\n") == 1 + len(HOSTILE_NAMES)
    again = SkipLog(path)  # a resumed run
    for (key, reason), (key2, reason2) in zip(log.entries(), again.entries(), strict=True):
        with tally.bad_input():
            assert (key2, reason2) == (key, reason)
    assert again.count == len(HOSTILE_NAMES)
    assert os.fsencode(again.entries()[0][0]) == b"/data/bad\xff\xfe name.jpg"


@pytest.mark.parametrize("text", [*HOSTILE_NAMES, "", "\\", "\\\\x", "plain"])
def test_escaping_is_lossless_and_printable(text):
    field = escape_field(text)
    assert unescape_field(field) == text
    assert field.isprintable() and "\t" not in field and "\n" not in field
    field.encode("utf-8")  # no surrogates left


def test_files_written_before_escaping_are_read_and_rewritten(tmp_path):
    path = tmp_path / "skipped.tsv"
    path.write_text("/data/a b.jpg\tcorrupt: x\n/data/c\\d.png\tempty file\n/data/cut\tcorr")
    log = SkipLog(path)  # the old format, with a line cut short by a crash
    assert log.entries() == [("/data/a b.jpg", "corrupt: x"), ("/data/c\\d.png", "empty file")]
    log.add("/data/new\n.jpg", "not an image")
    assert path.read_text().splitlines() == [
        SKIP_LOG_HEADER,
        "/data/a b.jpg\tcorrupt: x",
        "/data/c\\\\d.png\tempty file",
        "/data/new\\n.jpg\tnot an image",
    ]
    assert SkipLog(path).entries() == log.entries()


def test_idx_files_are_read_no_further_than_their_header_says(tmp_path, tally):
    """The demo source's IDX files: a gzip bomb or a lying header is refused without
    inflating or reading what it claims."""
    header = b"\0\0\x08\x01" + struct.pack(">I", 10)  # 10 uint8 values
    bomb = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(header)
        for _ in range(64):
            f.write(bytes(1 << 20))  # inflates to 64 MiB
    liar = tmp_path / "liar.gz"
    with gzip.open(liar, "wb") as f:
        f.write(b"\0\0\x08\x01" + struct.pack(">I", 0xFFFFFFFF) + bytes(10))
    tracemalloc.start()
    try:
        with (
            tally.bad_input(),
            pytest.raises(DataError, match=r"longer than its header says \(18 bytes"),
        ):
            read_idx(bomb)
        with tally.bad_input(), pytest.raises(DataError, match=r"announces \(4294967295,\)"):
            read_idx(liar)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # neither file was read whole
