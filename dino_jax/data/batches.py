"""Host-side batch surgery: bad examples replaced, eval batches padded and masked, batches made
ahead of time on a thread. A batch is a dict of numpy arrays with the examples on axis 0."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from dino_jax.data.decode import SkipLog
from dino_jax.data.sources import DataError

Batch = dict[str, np.ndarray]
_END = object()  # in_background: the stream is exhausted


def fill_bad_slots(batch: Mapping[str, np.ndarray], ok: np.ndarray) -> Batch | None:
    """Copies of good examples in the slots of bad ones (None if no example is good).

    Replacing in place keeps every batch full and every step at the same stream position, so
    resuming stays exact whatever failed to decode.
    """
    good, bad = np.flatnonzero(ok), np.flatnonzero(~ok)
    if len(good) == 0:
        return None
    donors = good[np.arange(len(bad)) % len(good)]
    out = {k: np.array(v) for k, v in batch.items()}
    for value in out.values():
        value[bad] = value[donors]
    return out


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> Batch:
    """Zero-pad every entry to `size` rows (labels -1) and mark the real rows in "mask"."""
    n = len(batch["label"])
    mask = np.asarray(batch.get("mask", np.ones(n, bool)))
    if n == size:
        return {**batch, "mask": mask}
    out = {}
    for key, value in {**batch, "mask": mask}.items():
        fill = -1 if key == "label" else 0
        pad = np.full((size - n, *value.shape[1:]), fill, value.dtype)
        out[key] = np.concatenate([value, pad])
    return out


def empty_batch(size: int, canvas_size: int) -> Batch:
    return {
        "image": np.zeros((size, canvas_size, canvas_size, 3), np.uint8),
        "size": np.zeros((size, 2), np.int32),
        "label": np.full(size, -1, np.int32),
        "mask": np.zeros(size, bool),
    }


def in_background(batches: Iterator[Batch], ahead: int = 2) -> Iterator[Batch]:
    """`batches` produced on a daemon thread, `ahead` in advance (numpy copies drop the GIL)."""
    ready: queue.Queue = queue.Queue(ahead)
    stop = threading.Event()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def work() -> None:
        try:
            for batch in batches:
                put(batch)
                if stop.is_set():
                    return
        except Exception as e:
            put(e)
        else:
            put(_END)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()  # the consumer is gone (closed or collected): let the thread end


def without_bad(batches: Iterable[Batch], skips: SkipLog) -> Iterator[Batch]:
    last = None
    for batch in batches:
        ok = batch.pop("ok")
        if not ok.all():
            batch = fill_bad_slots(batch, ok)
            if batch is None and last is None:
                raise DataError(
                    f"no image of the first batch could be read; skipped so far: {skips.summary()}"
                    f", e.g. {skips.entries()[:3]}"
                )
            batch = last if batch is None else batch
        last = batch
        yield batch
