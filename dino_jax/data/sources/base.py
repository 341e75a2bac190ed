"""The three shapes a source takes (decoded arrays, random-access bytes, record streams)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np


class DataError(ValueError):
    """The data cannot be read as configured; raised at start-up, before any compute."""


# What the TFDS and image-folder sources need beyond the base install, and how to get it.
TF_EXTRA = "pip install 'dino_jax[tfds]' (or pip install -r requirements-tfds.txt in a checkout)"
NEEDS = {"tfds": ("tensorflow", "tensorflow_datasets"), "folder": ("tensorflow",)}


def missing_packages(source: str) -> str | None:
    """Why data source `source` cannot run in this environment (a package it needs is not
    installed), with the command that fixes it; None when it can."""
    missing = []
    for name in NEEDS.get(source, ()):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked installation
            found = False
        if not found:
            missing.append(name)
    if not missing:
        return None
    return (
        f"data.source={source!r} needs {' and '.join(missing)}, which is not installed:"
        f" {TF_EXTRA}; the demo and synthetic sources need neither"
    )


@functools.cache
def import_tensorflow() -> Any:
    """TensorFlow for the host pipeline, with every GPU hidden from it (the device is JAX's)."""
    try:
        import tensorflow as tf
    except ImportError as err:
        raise DataError(f"TensorFlow cannot be imported ({err}): {TF_EXTRA}") from None

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        # TF was initialised elsewhere first; it is only a problem if it actually holds a GPU.
        if tf.config.get_visible_devices("GPU"):
            raise RuntimeError(
                "TensorFlow was initialised with GPUs visible before the data pipeline hid "
                'them; call tf.config.set_visible_devices([], "GPU") before any TF use'
            ) from None
    return tf


def process_slice(n: int, process_index: int, process_count: int) -> np.ndarray:
    """Example ids of this process: a stride through all n, so every slice sees every class."""
    return np.arange(process_index, n, process_count, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Decoded images in memory: example i is images[i % len(images)] with sizes[same]."""

    name: str
    images: np.ndarray  # (M, h, w, C) uint8, C = 1 (greyscale) or 3, zero outside sizes
    sizes: np.ndarray  # (M, 2) int32 valid (height, width)
    labels: np.ndarray  # (N_local,) int32, -1 where unlabelled
    global_size: int  # examples over all processes

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: np.ndarray, canvas_size: int) -> dict[str, np.ndarray]:
        """Canvases of local examples `indices`, greyscale broadcast to RGB."""
        pool = indices % len(self.images)
        images = self.images[pool]
        height, width, channels = images.shape[1:]
        if (height, width, channels) == (canvas_size, canvas_size, 3):
            canvas = images
        else:
            canvas = np.zeros((len(indices), canvas_size, canvas_size, 3), np.uint8)
            canvas[:, :height, :width] = images
        return {"image": canvas, "size": self.sizes[pool], "label": self.labels[indices]}


@dataclasses.dataclass(frozen=True)
class IndexedSource:
    """Encoded examples with random access by local index i: read(i) -> (bytes, label)."""

    name: str
    length: int
    read: Callable[[int], tuple[bytes, int]]  # raises decode.BadImage
    key: Callable[[int], str]  # what a skip log names example i by (a path, a record id)
    global_size: int

    def __len__(self) -> int:
        return self.length


@dataclasses.dataclass(frozen=True)
class RecordSource:
    """Encoded examples only readable in sequence (TFDS TFRecord files).

    records(seed) is a tf.data.Dataset of (data, label, key) tuples: files and examples shuffled
    with `seed` (an int), or in stored order when seed is None.
    """

    name: str
    length: int
    records: Callable[[int | None], Any]
    global_size: int

    def __len__(self) -> int:
        return self.length


Source = ArraySource | IndexedSource | RecordSource
