"""Encoded bytes -> RGB uint8 on a zero-padded canvas, with every refusal recorded in a SkipLog.

The host does only this per image: decode, at most one antialiased downscale, pad (docs/data.md).
"""

from __future__ import annotations

import collections
import errno
import io
import os
import threading
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image

# Oversized images are refused below, by our own header check, and logged with their size; PIL's
# warning about them would only repeat that on stderr.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# 16-bit greyscale modes: PIL's convert("RGB") clips them at 255 instead of rescaling.
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


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
    palette converted) except 16-bit greyscale, which is rescaled rather than clipped.
    """
    if not data:
        raise BadImage("empty file")
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
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.size[0] * image.size[1] > limit:
        raise BadImage(f"too large: {width}x{height} pixels, over PIL's limit of {limit}")
    try:
        image.load()
        rgb = _to_rgb(image)
    except Exception as e:  # PIL raises many types for broken files; each is just a bad input.
        raise BadImage(f"corrupt: {type(e).__name__}: {e}") from None
    if rgb.shape[:2] != (target_h, target_w):
        resized = Image.fromarray(rgb).resize((target_w, target_h), Image.Resampling.BICUBIC)
        rgb = np.asarray(resized)
    return rgb


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


def read_file(path: str) -> bytes:
    """The bytes of one listed file, or BadImage naming the OS error (gone, loop, permissions)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadImage("symlink loop") from None
        raise BadImage(f"unreadable: {e.strerror or type(e).__name__}") from None


def reason_kind(reason: str) -> str:
    """The category of a reason ("corrupt: OSError: ..." -> "corrupt"), for summaries."""
    return reason.split(":", 1)[0]


class SkipLog:
    """Inputs left out of the stream and why: thread-safe, one entry per distinct input.

    Decoding runs in tf.data worker threads and read-ahead, so an entry can appear a few
    batches before the training step that would have used the input. With `path`, each new
    entry is also appended to that file as `key<TAB>reason` as it happens, and the entries
    already in it are read back first.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        self._events = 0
        self.path = None if path is None else os.fspath(path)
        if self.path is not None and os.path.exists(self.path):
            # A resumed run: inputs listed by an earlier start stay listed (and counted) once.
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    key, tab, reason = line.rstrip("\n").partition("\t")
                    if tab:
                        self._entries.setdefault(key, reason)

    def add(self, key: str, reason: str) -> None:
        with self._lock:
            self._events += 1
            if key in self._entries:
                return
            self._entries[key] = reason
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(f"{key}\t{reason}\n")

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
