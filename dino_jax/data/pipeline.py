"""Host input pipeline: each process's batches of padded canvases, in a seeded, resumable order.

This module holds the example order, the training and evaluation streams and their placement on
the devices; tf_batches.py holds the tf.data decoding that the indexed and record sources use.

A batch is {"image": uint8 (B, L, L, 3), "size": int32 (B, 2), "label": int32 (B,)} (eval
batches add "mask": bool (B,)); see docs/data.md. Keys read under `config.data`:

  source              "tfds" | "folder" | "demo" | "synthetic".
  split               split to train on: a TFDS split ("train", "train[:10%]"), a sub-folder of
                      data_dir for `folder` ("" = data_dir itself), "train"/"test" for `demo`.
  eval_train_split    split whose features form the k-NN bank (e.g. "train"); passed by the
                      evaluator to `eval_data`. The folder source labels the test split by
                      the bank's class names (sources/folder.py), so it reads both keys.
  eval_test_split     split that is classified by k-NN (e.g. "validation", "test", "val").
  tfds_name           TFDS dataset name, with optional config/version ("imagenet2012").
  data_dir            TFDS data_dir; the image folder (folder); a directory of Fashion-MNIST IDX
                      files to use the full set instead of the bundled subset (demo, "" = bundled).
  manual_dir          TFDS manual download directory (imagenet2012 archives); "" if none.
  canvas_size         L: the canvas side. Larger images are downscaled once so max(h, w) = L.
  seed                data order seed: epoch e of process p is a permutation seeded by (seed, e, p).
  shuffle_buffer      examples in the shuffle buffer of TFRecord-backed TFDS datasets (other
                      sources permute whole epochs and do not use it).
  num_parallel_calls  decode threads; 0 or less lets tf.data tune it.
  synthetic_examples  dataset length of the synthetic source.
  synthetic_classes   labels of the synthetic source are drawn from range(synthetic_classes).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from dino_jax.data.batches import (
    Batch,
    close_quietly,
    empty_batch,
    in_background,
    pad_batch,
    without_bad,
)
from dino_jax.data.decode import SkipLog, load_example
from dino_jax.data.sources import (
    ArraySource,
    DataError,
    IndexedSource,
    Source,
    import_tensorflow,
    open_source,
)
from dino_jax.data.tf_batches import _decoded_batches
from dino_jax.parallel import global_batch_from_local

_LOG = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- order


def order_seed(seed: int, epoch: int, process_index: int) -> int:
    """A 63-bit seed for one (seed, epoch, process): fits the int64 seeds of tf.data too."""
    state = np.random.SeedSequence([seed, epoch, process_index]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, process_index: int, n: int) -> np.ndarray:
    """The order in which this process visits its n local examples in `epoch`."""
    order = np.random.default_rng(order_seed(seed, epoch, process_index)).permutation(n)
    order.flags.writeable = False
    return order


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise DataError(
            f"global batch size {global_batch_size} must be a positive multiple of the "
            f"{process_count} processes"
        )
    return global_batch_size // process_count


def _load_index(source: IndexedSource, canvas_size: int, skips: SkipLog, index: int) -> tuple:
    i = int(index)
    return load_example(lambda: source.read(i), lambda: source.key(i), canvas_size, skips)


def _load_record(canvas_size: int, skips: SkipLog, data: bytes, label: int, key: bytes) -> tuple:
    read = lambda: (data, int(label))
    return load_example(read, lambda: key.decode(errors="replace"), canvas_size, skips)


# ----------------------------------------------------------------------------- streams


@dataclasses.dataclass(frozen=True)
class TrainData:
    """An endless training stream of this process's batches, starting at `start_step`.

    Step s holds examples [s * B, (s + 1) * B) of the stream; each epoch is `steps_per_epoch`
    batches of a fresh permutation (the remainder of an epoch is dropped, as the official
    DataLoader(drop_last=True) does). Iterating again restarts at `start_step`.
    """

    source: Source
    local_batch_size: int
    steps_per_epoch: int
    start_step: int
    seed: int
    process_index: int
    canvas_size: int
    num_parallel_calls: int
    shuffle_buffer: int
    skips: SkipLog

    def indices(self, step: int) -> np.ndarray:
        """Local example indices of `step` (sources with random access only)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.seed, epoch, self.process_index, len(self.source))
        start = offset * self.local_batch_size
        return order[start : start + self.local_batch_size]

    def __iter__(self) -> Iterator[Batch]:
        if isinstance(self.source, ArraySource):
            steps = itertools.count(self.start_step)
            gathered = (self.source.batch(self.indices(s), self.canvas_size) for s in steps)
            return in_background(gathered)
        if isinstance(self.source, IndexedSource):
            return without_bad(self._indexed(), self.skips)
        return without_bad(self._records(), self.skips)

    def _indexed(self) -> Iterator[Batch]:
        tf = import_tensorflow()
        batch, per_epoch = self.local_batch_size, self.steps_per_epoch * self.local_batch_size
        load = functools.partial(_load_index, self.source, self.canvas_size, self.skips)

        def load_position(position: np.int64) -> tuple:
            epoch, offset = divmod(int(position), per_epoch)
            order = epoch_order(self.seed, epoch, self.process_index, len(self.source))
            return load(order[offset])

        # Resuming is free: the stream starts at the first position of start_step.
        positions = tf.data.Dataset.range(self.start_step * batch, 2**62)
        calls = self.num_parallel_calls
        return _decoded_batches(positions, load_position, batch, self.canvas_size, calls, True)

    def _records(self) -> Iterator[Batch]:
        load = functools.partial(_load_record, self.canvas_size, self.skips)
        first_epoch, offset = divmod(self.start_step, self.steps_per_epoch)
        per_epoch = self.steps_per_epoch * self.local_batch_size
        for epoch in itertools.count(first_epoch):
            seed = order_seed(self.seed, epoch, self.process_index)
            ds = self.source.records(seed)  # files in a seeded order, then a seeded buffer
            if self.shuffle_buffer > 1:
                ds = ds.shuffle(self.shuffle_buffer, seed=seed)
            ds = ds.take(per_epoch)
            if epoch == first_epoch and offset:
                # Records before the resume point are read and dropped, but never decoded.
                ds = ds.skip(offset * self.local_batch_size)
            batches = _decoded_batches(
                ds, load, self.local_batch_size, self.canvas_size, self.num_parallel_calls, True
            )
            try:
                yield from batches
            finally:
                batches.close()


@dataclasses.dataclass(frozen=True)
class EvalData:
    """Every example of this process's slice once, in stored order, then padding.

    All processes yield `num_batches` batches (the largest slice decides), so global arrays
    can be formed at every step; "mask" is False on padding and on inputs that failed to load.
    """

    source: Source
    local_batch_size: int
    num_batches: int
    canvas_size: int
    num_parallel_calls: int
    skips: SkipLog

    def __iter__(self) -> Iterator[Batch]:
        size, n = self.local_batch_size, len(self.source)
        if isinstance(self.source, ArraySource):
            chunks = (np.arange(i, min(i + size, n)) for i in range(0, n, size))
            batches = (self.source.batch(c, self.canvas_size) for c in chunks)
        elif isinstance(self.source, IndexedSource):
            tf = import_tensorflow()
            load = functools.partial(_load_index, self.source, self.canvas_size, self.skips)
            ds = tf.data.Dataset.range(n)
            batches = _decoded_batches(
                ds, load, size, self.canvas_size, self.num_parallel_calls, False
            )
        else:
            load = functools.partial(_load_record, self.canvas_size, self.skips)
            records = self.source.records(None)
            batches = _decoded_batches(
                records, load, size, self.canvas_size, self.num_parallel_calls, False
            )
        count = 0
        try:
            for batch in batches:
                if "ok" in batch:
                    batch["mask"] = batch.pop("ok")
                count += 1
                yield pad_batch(batch, size)
        finally:
            close_quietly(batches)
        for _ in range(self.num_batches - count):
            yield empty_batch(size, self.canvas_size)


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    return index, count


def train_data(
    data_config: Any,
    global_batch_size: int,
    *,
    start_step: int = 0,
    skips: SkipLog | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainData:
    """The training stream of config.data.split; opens the source now, so errors come early."""
    index, count = _processes(process_index, process_count)
    batch = local_batch_size(global_batch_size, count)
    skips = SkipLog() if skips is None else skips
    source = open_source(
        data_config,
        data_config.split,
        training=True,
        process_index=index,
        process_count=count,
        skips=skips,
    )
    steps = source.global_size // count // batch
    if steps == 0:
        raise DataError(
            f"{source.name} has {source.global_size} examples, fewer than one global batch of "
            f"{global_batch_size}: lower the batch size or add data"
        )
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    _LOG.info(
        "train data %s: %d examples here, %d steps per epoch, %d skipped at listing",
        source.name,
        len(source),
        steps,
        skips.count,
    )
    return TrainData(
        source=source,
        local_batch_size=batch,
        steps_per_epoch=steps,
        start_step=start_step,
        seed=data_config.seed,
        process_index=index,
        canvas_size=data_config.canvas_size,
        num_parallel_calls=data_config.num_parallel_calls,
        shuffle_buffer=data_config.shuffle_buffer,
        skips=skips,
    )


def eval_data(
    data_config: Any,
    split: str,
    global_batch_size: int,
    *,
    skips: SkipLog | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalData:
    """Every example of `split` once (e.g. config.data.eval_train_split for the k-NN bank)."""
    index, count = _processes(process_index, process_count)
    batch = local_batch_size(global_batch_size, count)
    skips = SkipLog() if skips is None else skips
    source = open_source(
        data_config, split, training=False, process_index=index, process_count=count, skips=skips
    )
    largest_slice = math.ceil(source.global_size / count)
    return EvalData(
        source=source,
        local_batch_size=batch,
        num_batches=math.ceil(largest_slice / batch),
        canvas_size=data_config.canvas_size,
        num_parallel_calls=data_config.num_parallel_calls,
        skips=skips,
    )


# ----------------------------------------------------------------------------- devices


def to_global(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's batch -> global arrays sharded on their first axis over the mesh."""
    return {key: global_batch_from_local(np.asarray(v), mesh) for key, v in batch.items()}


def device_batches(
    batches: Iterable[Mapping[str, np.ndarray]], mesh: jax.sharding.Mesh, prefetch: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Global batches with `prefetch` transfers in flight ahead of the consumer; closing this
    stream (or its failing) closes `batches`."""
    queue: collections.deque = collections.deque()
    try:
        for batch in batches:
            queue.append(to_global(batch, mesh))
            if len(queue) > prefetch:
                yield queue.popleft()
    finally:
        close_quietly(batches)
    while queue:
        yield queue.popleft()
