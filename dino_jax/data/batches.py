"""Host-side batch surgery: bad examples replaced, eval batches padded and masked, batches made
ahead of time on a thread. A batch is a dict of numpy arrays with the examples on axis 0.

Streams that keep work going in the background (threads, tf.data iterators) are closed
explicitly: by their consumer (`close()`, also on errors), and at the latest when the
interpreter exits (close_at_exit), before Python finalization. A tf.data iterator still
decoding when Python finalizes never finishes (its threads cannot take the GIL any more) and
the process hangs; closing it first ends its threads in well under a second.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from dino_jax.data.decode import SkipLog
from dino_jax.data.sources import DataError

Batch = dict[str, np.ndarray]
_END = object()  # in_background: the stream is exhausted
_LOG = logging.getLogger(__name__)
# A warning once a stream has skipped at least this share of the inputs it has read.
HIGH_SKIP_SHARE = 0.5

_open_streams: weakref.WeakSet = weakref.WeakSet()


def close_at_exit(stream: Any) -> Any:
    """Register `stream` (anything with close()) to be closed before the interpreter exits."""
    _open_streams.add(stream)
    return stream


@atexit.register
def close_open_streams() -> None:
    """Close every registered stream still open (atexit runs before Python finalizes)."""
    for stream in list(_open_streams):
        try:
            stream.close()
        except Exception:  # exiting anyway: one stream's failure must not keep others open
            _LOG.debug("closing %r at exit failed", stream, exc_info=True)


def close_quietly(stream: Any) -> None:
    """stream.close() if it has one (iterators of finite lists have none)."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()


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


def in_background(batches: Iterator[Batch], ahead: int = 2) -> BackgroundBatches:
    """`batches` produced on a daemon thread, `ahead` in advance (numpy copies drop the GIL)."""
    return BackgroundBatches(batches, ahead)


class BackgroundBatches:
    """An iterator over batches made by a daemon thread. close() (also called when the stream
    ends or fails, and at exit) stops the thread within 0.1 s and closes the source."""

    def __init__(self, batches: Iterator[Batch], ahead: int = 2):
        self._ready: queue.Queue = queue.Queue(ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(batches,), daemon=True)
        self._thread.start()
        close_at_exit(self)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def _work(self, batches: Iterator[Batch]) -> None:
        try:
            for batch in batches:
                self._put(batch)
                if self._stop.is_set():
                    return
        except Exception as e:
            self._put(e)
        else:
            self._put(_END)
        finally:
            close_quietly(batches)

    def __iter__(self) -> BackgroundBatches:
        return self

    def __next__(self) -> Batch:
        while True:
            if self._stop.is_set():
                raise StopIteration
            try:
                item = self._ready.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._ready.empty():
                    self.close()  # the producer is gone without a last word
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, Exception):
            self.close()
            raise item
        return item

    def close(self, timeout: float = 5.0) -> None:
        """Stop the producer thread and wait for it (at most `timeout` seconds)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __del__(self) -> None:
        self._stop.set()  # the consumer is gone (collected): let the thread end


def without_bad(batches: Iterable[Batch], skips: SkipLog) -> Iterator[Batch]:
    """`batches` with the slots of unreadable inputs ("ok" False) filled by copies of readable
    ones of the same batch; a batch with no readable input repeats the previous batch.

    DataError if the first batch has no readable input (nothing to fill it with). A warning
    once at least HIGH_SKIP_SHARE of the inputs read so far were unreadable, and once when a
    whole batch was. `batches` is closed when this stream ends, fails or is closed."""
    last, counts, warned = None, np.zeros(2, np.int64), set()
    try:
        for batch in batches:
            ok = batch.pop("ok")
            counts += (len(ok), int(np.sum(~ok)))
            if not ok.all():
                filled = fill_bad_slots(batch, ok)
                if filled is None and last is None:
                    raise DataError(
                        f"no image of the first batch ({len(ok)} inputs) could be read; skipped"
                        f" so far: {skips.summary()}, e.g. {skips.examples()}; fix or remove "
                        "the unreadable files, or point config.data.data_dir at the images"
                    )
                if filled is None and "batch" not in warned:
                    warned.add("batch")
                    _LOG.warning(
                        "no input of a whole batch could be read: the previous batch is used"
                        " again in its place (skipped so far: %s)",
                        skips.summary(),
                    )
                batch = last if filled is None else filled
            if counts[1] >= HIGH_SKIP_SHARE * counts[0] and counts[1] and "share" not in warned:
                warned.add("share")
                _LOG.warning(
                    "%d of the first %d inputs could not be read (%s, e.g. %s): their slots are"
                    " filled with copies of readable images of the same batch, so the run sees"
                    " those more often; fix or remove the unreadable files",
                    counts[1],
                    counts[0],
                    skips.summary(),
                    skips.examples(),
                )
            last = batch
            yield batch
    finally:
        close_quietly(batches)
