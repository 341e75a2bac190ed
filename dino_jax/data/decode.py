"""Encoded bytes -> RGB uint8 on a zero-padded canvas, with every refusal recorded in a SkipLog.

The host does only this per image: decode, at most one antialiased downscale, pad (docs/data.md).
"""

from __future__ import annotations

import collections
import errno
import io
import os
import re
import stat
import threading
import warnings
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image

# Oversized images are refused below, by our own header check, and logged with their size; PIL's
# warning about them would only repeat that on stderr.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# 16-bit greyscale modes: PIL's convert("RGB") clips them at 255 instead of rescaling.
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})

# What one decode may cost, from the canvas side L (the pipeline never needs more than L x L
# pixels). Pixels decoded (after a JPEG's reduced-scale decoding): at most 64 canvases (8 L on
# a side), and never less than 4096 x 4096 so that ordinary photographs pass at small canvases.
# Bytes read: 4 per allowed pixel (an uncompressed RGBA image at the pixel limit) plus 1 MiB of
# headers and metadata. Not config keys: images beyond them are worth downscaling beforehand.
CANVASES_PER_IMAGE = 64
MIN_PIXEL_LIMIT = 4096 * 4096
BYTES_PER_PIXEL_LIMIT = 4
HEADER_BYTES = 1 << 20


def pixel_limit(canvas_size: int) -> int:
    """The most pixels decoded for one image on a canvas of side `canvas_size`."""
    return max(MIN_PIXEL_LIMIT, CANVASES_PER_IMAGE * canvas_size * canvas_size)


def byte_limit(canvas_size: int) -> int:
    """The largest encoded image (file or record) read for a canvas of side `canvas_size`."""
    return BYTES_PER_PIXEL_LIMIT * pixel_limit(canvas_size) + HEADER_BYTES


class BadImage(Exception):
    """One input that cannot become a training image; `reason` says why, in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def fit_size(height: int, width: int, canvas_size: int) -> tuple[int, int]:
    """(height, width) after the one host downscale: longer side at most `canvas_size`."""
    longer = max(height, width)
    if longer <= canvas_size:
        return height, width
    scale = canvas_size / longer
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_image(data: bytes, canvas_size: int) -> np.ndarray:
    """Decode to RGB uint8 (h, w, 3) with max(h, w) <= canvas_size; raise BadImage if it can't.

    Colour handling follows the official loader (PIL `convert("RGB")`: alpha dropped, CMYK and
    palette converted) except 16-bit greyscale, which is rescaled rather than clipped. Memory is
    bounded before any pixel is allocated: more than byte_limit(canvas_size) bytes, or more than
    pixel_limit(canvas_size) pixels to decode (read from the header), is refused as too large.
    """
    if not data:
        raise BadImage("empty file")
    max_bytes = byte_limit(canvas_size)
    if len(data) > max_bytes:
        raise BadImage(f"too large: {len(data):,} bytes > {max_bytes:,} for canvas {canvas_size}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large: {e}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image: unknown format") from None
    except Exception as e:  # a known format whose header is broken
        raise BadImage(f"corrupt: {type(e).__name__}: {e}") from None
    width, height = image.size
    target_h, target_w = fit_size(height, width, canvas_size)
    if image.format == "JPEG" and (target_h, target_w) != (height, width):
        # DCT-domain downscaling by 1/2..1/8 while decoding: big JPEGs cost a fraction of the
        # time and memory, and the result is still at least the target size.
        image.draft("RGB", (target_w, target_h))
    check_pixels(image.size, (width, height), canvas_size)
    try:
        image.load()
        rgb = _to_rgb(image)
    except Exception as e:  # PIL raises many types for broken files; each is just a bad input.
        raise BadImage(f"corrupt: {type(e).__name__}: {e}") from None
    if rgb.shape[:2] != (target_h, target_w):
        resized = Image.fromarray(rgb).resize((target_w, target_h), Image.Resampling.BICUBIC)
        rgb = np.asarray(resized)
    return rgb


def check_pixels(decoded: tuple[int, int], stored: tuple[int, int], canvas_size: int) -> None:
    """BadImage if decoding `decoded` (width, height) pixels, of an image stored as `stored`,
    would exceed the limit of the canvas (or PIL's own, if lower)."""
    limit = pixel_limit(canvas_size)
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = min(limit, int(Image.MAX_IMAGE_PIXELS))
    width, height = decoded
    if width * height <= limit:
        return
    scaled = "" if decoded == tuple(stored) else f" ({stored[0]}x{stored[1]} stored)"
    raise BadImage(
        f"too large: {width}x{height} pixels to decode{scaled} > {limit:,} for canvas"
        f" {canvas_size}; downscale such images beforehand"
    )


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _WIDE_GREY_MODES:
        grey = np.asarray(image).astype(np.int64)
        grey = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def to_canvas(rgb: np.ndarray, canvas_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Place (h, w, 3) in the top-left corner of a zero (L, L, 3) canvas; return it and (h, w)."""
    height, width = rgb.shape[:2]
    canvas = np.zeros((canvas_size, canvas_size, 3), np.uint8)
    canvas[:height, :width] = rgb
    return canvas, np.array([height, width], np.int32)


def load_example(read: Callable, key: Callable, canvas_size: int, skips: SkipLog) -> tuple:
    """read() -> (bytes, label) as (rgb (h, w, 3), size, label, ok), not yet padded; a bad input
    is logged under key() and comes back empty with ok=False, for the caller to decide."""
    label = -1
    try:
        data, label = read()
        rgb = decode_image(data, canvas_size)
    except BadImage as e:
        skips.add(key(), e.reason)
        empty = np.zeros((0, 0, 3), np.uint8)
        return empty, np.zeros(2, np.int32), np.int32(label), np.bool_(False)
    return rgb, np.array(rgb.shape[:2], np.int32), np.int32(label), np.bool_(True)


def read_file(path: str, max_bytes: int) -> bytes:
    """The bytes of one listed file, at most `max_bytes` of them, or BadImage naming what is
    wrong: the OS error (gone, loop, permissions), not a regular file, or too large.

    The checks are made on the opened file, so a file replaced after the listing (by a FIFO,
    a device, a huge file) is refused too; opening does not block and reading stops at
    max_bytes + 1 however long the file is or grows."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _unreadable(e) from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BadImage("not a regular file")
            if info.st_size > max_bytes:
                raise BadImage(f"too large: file of {info.st_size:,} bytes > {max_bytes:,}")
            data = _read_at_most(f, max_bytes + 1)
        except OSError as e:
            raise _unreadable(e) from None
    if len(data) > max_bytes:
        raise BadImage(f"too large: file of more than {max_bytes:,} bytes (it grew)")
    return data


def _read_at_most(f, size: int) -> bytes:
    chunks, left = [], size
    while left > 0:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _unreadable(error: OSError) -> BadImage:
    if error.errno == errno.ELOOP:
        return BadImage("symlink loop")
    return BadImage(f"unreadable: {error.strerror or type(error).__name__}")


def reason_kind(reason: str) -> str:
    """The category of a reason ("corrupt: OSError: ..." -> "corrupt"), for summaries."""
    return reason.split(":", 1)[0]


# The skip log's format. Its first line is SKIP_LOG_HEADER; then one input per line,
# `key<TAB>reason`, each field escaped by escape_field so that any file name (tabs, newlines,
# bytes that are not UTF-8) is written as one readable line and read back exactly. Files
# without the header (written before escaping) are read as raw text and rewritten.
SKIP_LOG_HEADER = (
    "# skipped inputs: key<TAB>reason per line; backslash escapes: \\\\ \\t \\n \\r, \\xNN for"
    " other control characters and for bytes that are not UTF-8, \\uXXXX for other unprintable"
    " characters"
)
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
_ESCAPED = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))", re.DOTALL)


def escape_field(text: str) -> str:
    """`text` as printable UTF-8 on one line without tabs, losslessly (see unescape_field).

    A file name that is not valid UTF-8 reaches Python with each bad byte b as the lone
    surrogate U+DC00 + b (os.fsdecode's surrogateescape); it is written as \\xNN, as are ASCII
    control characters. Other unprintable characters (C1 controls, line and paragraph
    separators, other lone surrogates, ...) become \\uXXXX (\\UXXXXXXXX beyond U+FFFF)."""
    out = []
    for char in text:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char.isprintable():
            out.append(char)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def unescape_field(field: str) -> str:
    """The text that escape_field turned into `field`."""

    def one(match: re.Match) -> str:
        byte, code, long_code, char = match.groups()
        if byte is not None:
            value = int(byte, 16)
            return chr(value) if value < 0x80 else chr(0xDC00 + value)
        if code is not None or long_code is not None:
            return chr(int(code or long_code, 16))
        return _UNESCAPES.get(char, char)

    return _ESCAPED.sub(one, field)


def printable(text: str) -> str:
    """`text` for a message: every character printable on any terminal or log file."""
    return escape_field(text)


def read_skip_log(path: str) -> tuple[list[tuple[str, str]], bool]:
    """(entries in file order, whether the file needs rewriting: written before escaping, or
    its last line cut short by a crash). A missing file has no entries."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return [], False
    text = raw.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # text after the last newline: an unfinished write
    escaped = bool(complete) and complete[0] == SKIP_LOG_HEADER
    entries = []
    for line in complete[1:] if escaped else complete:
        key, tab, reason = line.partition("\t")
        if not tab:
            continue
        if escaped:
            key, reason = unescape_field(key), unescape_field(reason)
        entries.append((key, reason))
    return entries, bool(tail) or (bool(complete) and not escaped)


def write_skip_log(path: str, entries: Iterable[tuple[str, str]]) -> None:
    """Replace the file at `path` by the header and `entries`, atomically."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8", newline="\n") as f:
        f.write(SKIP_LOG_HEADER + "\n")
        for key, reason in entries:
            f.write(skip_line(key, reason))
    os.replace(temporary, path)


def skip_line(key: str, reason: str) -> str:
    return f"{escape_field(key)}\t{escape_field(reason)}\n"


class SkipLog:
    """Inputs left out of the stream and why: thread-safe, one entry per distinct input.

    Decoding runs in tf.data worker threads and read-ahead, so an entry can appear a few
    batches before the training step that would have used the input. With `path`, each new
    entry is also appended to that file as it happens (format: SKIP_LOG_HEADER), and the
    entries already in it are read back first.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        self._events = 0
        self.path = None if path is None else os.fspath(path)
        if self.path is None:
            return
        # A resumed run: inputs listed by an earlier start stay listed (and counted) once.
        entries, stale = read_skip_log(self.path)
        for key, reason in entries:
            self._entries.setdefault(key, reason)
        if stale:
            write_skip_log(self.path, self._entries.items())

    def add(self, key: str, reason: str) -> None:
        with self._lock:
            self._events += 1
            if key in self._entries:
                return
            self._entries[key] = reason
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8", newline="\n") as f:
                    if f.tell() == 0:  # the first entry creates the file
                        f.write(SKIP_LOG_HEADER + "\n")
                    f.write(skip_line(key, reason))

    @property
    def count(self) -> int:
        """Distinct inputs skipped."""
        with self._lock:
            return len(self._entries)

    @property
    def events(self) -> int:
        """Times an input was skipped (a bad file met again in a later epoch counts again)."""
        with self._lock:
            return self._events

    def entries(self, start: int = 0) -> list[tuple[str, str]]:
        """(key, reason) in the order first met; `start` returns only the newer ones."""
        with self._lock:
            return list(self._entries.items())[start:]

    def summary(self) -> dict[str, int]:
        """Distinct skipped inputs per reason category, e.g. {"corrupt": 2, "too large": 1}."""
        with self._lock:
            return dict(collections.Counter(reason_kind(r) for r in self._entries.values()))

    def examples(self, n: int = 3) -> str:
        """The first `n` entries, printable, for a message."""
        shown = [f"{printable(k)} ({printable(r)})" for k, r in self.entries()[:n]]
        return "; ".join(shown) if shown else "none"
