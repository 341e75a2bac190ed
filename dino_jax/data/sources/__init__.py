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
    "import_tensorflow",
    "missing_packages",
    "open_source",
    "process_slice",
]


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
