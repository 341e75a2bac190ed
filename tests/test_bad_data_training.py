"""A folder dataset salted with hostile files: training goes on, and every skipped file is listed
with its reason in the work directory and counted in the logged `data/skipped_files`."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from helpers.fault_helpers import logged
from helpers.tiny import tiny_config
from PIL import Image

from dino_jax.data.decode import read_skip_log, reason_kind
from dino_jax.data.sources import folder
from dino_jax.trainer import train

RNG = np.random.default_rng(0)
USED = "used"  # a hostile-looking file that decodes and trains


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(height: int, width: int, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), np.uint8)).convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, depth: int, colour: int, rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    body = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IEND", b"")


def grey16(height: int, width: int) -> bytes:
    row = b"\0" + (np.arange(width, dtype=">u2") * 3000).tobytes()
    return png(width, height, 16, 0, row * height)


def huge_jpeg_header(side: int = 20_000) -> bytes:
    """Markers of a side x side baseline JPEG without any image data."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, side, side, 3) + b"\x01\x11\x00" * 3
    sos = b"\xff\xda" + struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    return b"\xff\xd8" + sof + sos + b"\0" * 16 + b"\xff\xd9"


def build_corpus(root) -> dict:
    """32 listed files (two batches of 16) and 5 entries refused at listing.
    Returns {path: expected reason kind, or USED}.

    The tests run as root, where permission bits do not stop reads: the unreadable files are a
    link to /proc/self/mem (open succeeds, read fails with EIO) and one deleted after listing.
    The chmod 000 file is read as root and skipped as unreadable otherwise.
    """
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    for i in range(8):
        (a / f"good{i}.png").write_bytes(encode(noise(20 + i, 30 - i), "PNG"))
        (b / f"good{i}.jpg").write_bytes(encode(noise(24, 18 + i), "JPEG"))
    expected = {}
    # Clutter that is neither a class nor an image: a zip's resource forks, NAS thumbnails.
    (root / "__MACOSX" / "a").mkdir(parents=True)
    (root / "__MACOSX" / "a" / "._good0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (a / "@eaDir" / "good0.png").mkdir(parents=True)
    (a / "@eaDir" / "good0.png" / "SYNOPHOTO_THUMB_S.jpg").write_bytes(encode(noise(8, 8), "JPEG"))
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (b / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")

    def put(path, data: bytes, outcome: str):
        path.write_bytes(data)
        expected[path] = outcome

    put(a / "cmyk.jpg", encode(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG"), USED)
    put(a / "grey16.png", grey16(9, 13), USED)
    put(a / "palette.png", encode(noise(10, 10, "P"), "PNG"), USED)
    put(b / "palette_alpha.png", encode(noise(12, 8, "P"), "PNG", transparency=0), USED)
    put(b / "rgba.png", encode(noise(8, 8, "RGBA"), "PNG"), USED)
    put(b / "one_pixel.png", encode(noise(1, 1), "PNG"), USED)
    put(b / "sliver.png", encode(noise(1, 300), "PNG"), USED)
    put(
        a / "locked.jpg", encode(noise(16, 16), "JPEG"), USED if os.geteuid() == 0 else "unreadable"
    )
    os.chmod(a / "locked.jpg", 0)
    # File names that a log must write losslessly: bytes that are not UTF-8, a tab, line breaks,
    # backslashes that look like escapes; and a good image named with bytes that are not UTF-8.
    put(a / os.fsdecode(b"trunc\xff\xfeated.jpg"), encode(noise(64, 64), "JPEG")[:600], "corrupt")
    os.rename(b / "good0.jpg", b / os.fsdecode(b"g\xe9\xff good0.jpg"))
    put(b / "truncated.png", encode(noise(64, 64), "PNG")[:300], "corrupt")
    put(a / "empty \\x41 \\\\ back\\slash.jpg", b"", "empty file")
    text = b"these are not the pixels you are looking for\n"
    put(b / "text\twith a tab\nand a newline\r.jpg", text, "not an image")
    put(a / "huge.png", png(20_000, 20_000, 8, 2, b"\0" * 64)[:-12], "too large")
    put(b / "huge.jpg", huge_jpeg_header(), "too large")
    put(a / "gone.png", encode(noise(8, 8), "PNG"), "unreadable")  # deleted after listing
    os.symlink("/proc/self/mem", a / "mem.jpg")
    expected[a / "mem.jpg"] = "unreadable"
    os.symlink("loop_b.jpg", b / "loop_a.jpg")
    os.symlink("loop_a.jpg", b / "loop_b.jpg")
    os.symlink("missing.jpg", a / "dangling.jpg")
    os.mkfifo(a / "fifo.jpg")  # opening it to read would block forever
    os.symlink("..", b / "loop")
    expected.update(
        {
            b / "loop_a.jpg": "symlink loop",
            b / "loop_b.jpg": "symlink loop",
            a / "dangling.jpg": "broken symlink",
            a / "fifo.jpg": "not a regular file",
            b / "loop": "symlink loop",
        }
    )
    return expected


def read_skips(workdir) -> dict[str, str]:
    entries, stale = read_skip_log(str(workdir / "skipped_files.tsv"))
    assert not stale
    assert len({k for k, _ in entries}) == len(entries), "a file is listed twice"
    return dict(entries)


def test_training_goes_on_and_lists_every_skipped_file(tmp_path, tally, monkeypatch):
    expected = build_corpus(tmp_path / "images")
    listing = folder.list_folder

    def list_then_delete(root, skips):
        result = listing(root, skips)
        assert result.class_names == ("a", "b")  # __MACOSX is no class
        os.remove(tmp_path / "images" / "a" / "gone.png")  # vanishes between listing and read
        return result

    monkeypatch.setattr(folder, "list_folder", list_then_delete)
    config = tiny_config(
        **{
            "data.source": "folder",
            "data.data_dir": str(tmp_path / "images"),
            "data.split": "",
            "optim.epochs": 5,
            "train.max_steps": 4,  # two epochs of two steps: every listed file is read
        }
    )
    workdir = tmp_path / "run"
    result = train(config, str(workdir))
    assert result.status == "max_steps" and int(result.state.step) == 4
    assert result.steps_per_epoch == 2
    skipped = read_skips(workdir)
    for path, outcome in expected.items():
        with tally.bad_input():
            if outcome == USED:
                assert str(path) not in skipped
            else:
                assert reason_kind(skipped[str(path)]) == outcome, (path, skipped.get(str(path)))
    assert len(skipped) == sum(outcome != USED for outcome in expected.values())
    assert logged(workdir, "data/skipped_files")[-1] == (4, len(skipped))

    # A resumed run reads the list back: every file stays listed once.
    (tmp_path / "images" / "a" / "gone.png").write_bytes(encode(noise(8, 8), "PNG"))
    config.train.max_steps = 6
    assert int(train(config, str(workdir)).state.step) == 6
    assert read_skips(workdir) == skipped
    assert logged(workdir, "data/skipped_files")[-1] == (6, len(skipped))


@pytest.fixture(autouse=True)
def _unlock(tmp_path):
    yield
    locked = tmp_path / "images" / "a" / "locked.jpg"
    if locked.exists():
        os.chmod(locked, 0o644)  # lets pytest clean the directory up as a normal user
