"""tf.data decoding for the host pipeline: a Python load mapped over a tf.data stream in
parallel, in order, then zero-padded into numpy batches of canvases, with an explicit end.

TfBatches.close() cancels the decodes not yet started and releases the tf.data iterator, so
its threads stop once a stream is closed or has failed (see batches.py on closing streams).
pipeline.py builds its training and evaluation streams of indexed and record sources on it.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from dino_jax.data.batches import Batch, close_at_exit
from dino_jax.data.sources import import_tensorflow


def _unless(cancelled: threading.Event, load: Callable) -> Callable:
    """`load`, except that once `cancelled` is set it returns an empty bad example at once
    (nothing read, decoded or logged): decodes queued when a stream closes cost nothing."""

    def load_unless_cancelled(*args: Any) -> tuple:
        if cancelled.is_set():
            empty = np.zeros((0, 0, 3), np.uint8)
            return empty, np.zeros(2, np.int32), np.int32(-1), np.bool_(False)
        return load(*args)

    return load_unless_cancelled


def _decoded(ds: Any, load: Callable, num_parallel_calls: int) -> Any:
    """Map `load` (Python, PIL) over a tf.data stream in parallel, keeping the order."""
    tf = import_tensorflow()

    def decode(*args: Any) -> dict[str, Any]:
        out = tf.numpy_function(load, list(args), [tf.uint8, tf.int32, tf.int32, tf.bool])
        image, size, label, ok = out
        image.set_shape((None, None, 3))
        size.set_shape((2,))
        label.set_shape(())
        ok.set_shape(())
        return {"image": image, "size": size, "label": label, "ok": ok}

    calls = num_parallel_calls if num_parallel_calls > 0 else tf.data.AUTOTUNE
    return ds.map(decode, num_parallel_calls=calls, deterministic=True)


def _numpy_batches(ds: Any, size: int, canvas_size: int, drop_remainder: bool) -> Any:
    """Batches with each image zero-padded into its canvas by tf.data (C++, one copy)."""
    tf = import_tensorflow()
    options = tf.data.Options()
    options.deterministic = True
    shapes = {"image": (canvas_size, canvas_size, 3), "size": (2,), "label": (), "ok": ()}
    ds = ds.padded_batch(size, padded_shapes=shapes, drop_remainder=drop_remainder)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(options)


def _forget_frames(error: BaseException) -> None:
    """Clear the local variables of the finished frames in `error`'s tracebacks (its context
    and cause included): TensorFlow's frames there hold the iterator, which must not outlive
    its stream. The traceback still prints in full."""
    seen, chained = set(), [error]
    while chained:
        error = chained.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        chained += [error.__cause__, error.__context__]


class TfBatches:
    """A tf.data pipeline's batches as numpy, with an explicit end.

    close() (called on errors, when the stream ends, by consumers, and at exit) cancels the
    decodes not yet started and releases the tf.data iterator, whose threads then stop, even
    if something (a traceback) still refers to this object."""

    def __init__(self, ds: Any, cancelled: threading.Event):
        self._cancelled = cancelled
        self._iterator: Any = ds.as_numpy_iterator()
        close_at_exit(self)

    def __iter__(self) -> TfBatches:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            raise StopIteration
        try:
            return next(self._iterator)
        except BaseException as error:
            self.close()
            _forget_frames(error)
            raise

    def close(self) -> None:
        self._cancelled.set()
        self._iterator = None


def _decoded_batches(
    ds: Any, load: Callable, size: int, canvas_size: int, num_parallel_calls: int, drop: bool
) -> TfBatches:
    """`load` mapped over `ds` in parallel, then padded batches of `size` (`drop`: the last
    partial batch)."""
    cancelled = threading.Event()
    decoded = _decoded(ds, _unless(cancelled, load), num_parallel_calls)
    return TfBatches(_numpy_batches(decoded, size, canvas_size, drop), cancelled)
