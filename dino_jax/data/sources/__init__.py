"""Data sources chosen by config.data.source: tfds, folder, demo, synthetic (one module each)."""

from __future__ import annotations

from typing import Any

from dino_jax.data.decode import SkipLog
from dino_jax.data.sources.base import (
    ArraySource,
    DataError,
    IndexedSource,
    RecordSource,
    Source,
    import_tensorflow,
    missing_packages,
    process_slice,
)

SOURCES = ("tfds", "folder", "demo", "synthetic")

__all__ = [
    "SOURCES",
    "ArraySource",
    "DataError",
    "IndexedSource",
    "RecordSource",
    "Source",
    "bank_split",
    "check_eval_classes",
    "import_tensorflow",
    "missing_packages",
    "open_source",
    "process_slice",
]


def bank_split(data_config: Any, split: str) -> str | None:
    """The k-NN bank split whose class names label `split`: eval_train_split when `split` is
    the configured k-NN test split (an evaluation is configured), else None (own classes)."""
    test = data_config.get("eval_test_split", "")  # configs of benchmarks name no eval splits
    if test and split == test:
        return data_config.get("eval_train_split", "")
    return None


def check_eval_classes(data_config: Any) -> None:
    """DataError if the configured k-NN evaluation's bank and test splits disagree on class
    names (a test class the bank lacks, or a split without classes). Only the folder source
    can disagree: TFDS splits share their dataset's class list, demo splits Fashion-MNIST's."""
    if data_config.source == "folder" and data_config.eval_test_split:
        from dino_jax.data.sources.folder import check_eval_classes as check_folders

        check_folders(
            data_config.data_dir, data_config.eval_train_split, data_config.eval_test_split
        )


def open_source(
    data_config: Any,
    split: str,
    *,
    training: bool,
    process_index: int,
    process_count: int,
    skips: SkipLog,
) -> Source:
    """This process's slice of `split` of the configured source; DataError if it is unusable.

    Everything that can be checked without decoding is checked here: paths, names, splits,
    emptiness. Imports are local so that a source never pulls in another's dependencies.
    """
    kind = data_config.source
    missing = missing_packages(kind)
    if missing:
        raise DataError(missing)
    if kind == "synthetic":
        from dino_jax.data.sources.synthetic import synthetic_source

        return synthetic_source(
            data_config.synthetic_examples,
            data_config.synthetic_classes,
            data_config.canvas_size,
            data_config.seed,
            process_index=process_index,
            process_count=process_count,
        )
    if kind == "demo":
        from dino_jax.data.sources.demo import demo_source

        return demo_source(
            split,
            data_config.data_dir,
            data_config.canvas_size,
            process_index=process_index,
            process_count=process_count,
        )
    if kind == "folder":
        from dino_jax.data.sources.folder import folder_source

        return folder_source(
            data_config.data_dir,
            split,
            process_index=process_index,
            process_count=process_count,
            skips=skips,
            canvas_size=data_config.canvas_size,
            bank_split=bank_split(data_config, split),
        )
    if kind == "tfds":
        from dino_jax.data.sources.tfds import tfds_source

        return tfds_source(
            data_config.tfds_name,
            split,
            data_dir=data_config.data_dir,
            manual_dir=data_config.manual_dir,
            training=training,
            process_index=process_index,
            process_count=process_count,
        )
    raise DataError(f"config.data.source={kind!r} is not one of {SOURCES}")
