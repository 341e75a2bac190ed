"""What a training start checks and opens before its work directory is locked or its state
built: the config, the work directory's path, the data and its sizes, the init_from file
(`preflight`); then the training stream from the start step, with the work directory's skip
log (`resumable_stream`, `skip_log`)."""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import ml_collections

from dino_jax import parallel
from dino_jax.data import pipeline
from dino_jax.data.decode import SkipLog
from dino_jax.starting_state import check_init_from
from dino_jax.validation import validate
from dino_jax.validation_sizes import DataSizes, check_sizes
from dino_jax.workdir import check_not_held, check_usable

_LOG = logging.getLogger(__name__)


def skip_log(workdir: str) -> SkipLog:
    """Inputs left out, listed in the work directory as they happen (one file per process)."""
    index = jax.process_index()
    name = "skipped_files.tsv" if index == 0 else f"skipped_files.process{index}.tsv"
    return SkipLog(os.path.join(workdir, name))


def split_size(config: ml_collections.ConfigDict, split: str, data: pipeline.TrainData) -> int:
    """Examples of `split` (all processes): the training stream's count for its own split,
    else the split opened (listed) for evaluation."""
    if split == config.data.split:
        return data.source.global_size
    return pipeline.eval_data(config.data, split, config.eval.batch_size).source.global_size


def data_sizes(config: ml_collections.ConfigDict, data: pipeline.TrainData) -> DataSizes:
    """The sizes of every split the run of `config` reads (`data`: its training stream)."""
    sizes = DataSizes(train=data.source.global_size, steps_per_epoch=data.steps_per_epoch)
    if config.data.eval_test_split:
        sizes = dataclasses.replace(
            sizes,
            bank=split_size(config, config.data.eval_train_split, data),
            test=split_size(config, config.data.eval_test_split, data),
        )
    return sizes


def preflight(config: ml_collections.ConfigDict, workdir: str, mesh) -> pipeline.TrainData:
    """Every check of a training start that needs no work directory, cheapest first: the
    config, the work directory's path (and whether another trainer holds it), the data
    (listed, its sizes against the settings) and the init_from file. Returns the training
    stream, opened at step 0 with an in-memory skip log (the run moves both: see _train)."""
    validate(config, mesh.size, jax.process_count(), jax.default_backend())
    check_usable(workdir)
    check_not_held(workdir, jax.process_index())  # at once; the lock itself is taken later
    # before anything slow (listing the data), while the processes are still in step
    parallel.connect_processes(mesh)
    data = pipeline.train_data(config.data, config.optim.batch_size, skips=SkipLog())
    for warning in check_sizes(config, data_sizes(config, data)):
        _LOG.warning("%s", warning)
    check_init_from(config)
    return data


def resumable_stream(data: pipeline.TrainData, start: int, skips: SkipLog) -> pipeline.TrainData:
    """`data` from step `start`, logging skipped inputs to `skips` (what its listing skipped
    included)."""
    for key, reason in data.skips.entries():
        skips.add(key, reason)
    return dataclasses.replace(data, start_step=start, skips=skips)
