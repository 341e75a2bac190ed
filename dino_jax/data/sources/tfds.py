"""Any TFDS dataset with an image feature: random access (ArrayRecord) or streams (TFRecord)."""

from __future__ import annotations

import difflib
import os
from typing import Any

from dino_jax.data.sources.base import DataError, IndexedSource, RecordSource, import_tensorflow


def _builder(name: str, data_dir: str, manual_dir: str, process_count: int) -> Any:
    import tensorflow_datasets as tfds

    if not name:
        raise DataError("config.data.source='tfds' needs config.data.tfds_name (e.g. imagenet2012)")
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        known = list(tfds.list_builders())
        if data_dir and os.path.isdir(data_dir):
            known += os.listdir(data_dir)  # prepared datasets, registered or not
        close = difflib.get_close_matches(name.split("/")[0].split(":")[0], known)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        where = data_dir or "TFDS's default data_dir"
        raise DataError(
            f"unknown TFDS dataset config.data.tfds_name={name!r}{hint}: it is neither a "
            f"registered TFDS builder nor prepared under {where}; fix the name or set "
            "config.data.data_dir to the directory that holds it"
        ) from None
    if builder.is_prepared():
        return builder
    command = f"tfds build {name} --data_dir={data_dir or '~/tensorflow_datasets'}"
    if manual_dir:
        command += f" --manual_dir={manual_dir}"
    if process_count > 1:
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; prepare it once before "
            f"a multi-process run: {command}"
        )
    config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    try:
        builder.download_and_prepare(download_config=config)
    except Exception as e:  # missing manual files, no network, ...: all mean "not prepared"
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and preparing it "
            f"failed ({type(e).__name__}: {str(e)[:500]}); for manual downloads (imagenet2012) "
            f"set config.data.manual_dir to the folder holding the archives, or run: {command}"
        ) from None
    return builder


def _feature_keys(builder: Any, name: str) -> tuple[str, str | None]:
    """(image key, label key or None): 'image'/'label' preferred, else the first such feature."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if not images:
        raise DataError(
            f"TFDS dataset {name!r} has no top-level image feature (features: {list(features)}); "
            "choose a dataset of images"
        )
    image_key = "image" if "image" in images else images[0]
    if features[image_key].np_dtype != "uint8":
        raise DataError(f"TFDS {name!r}: image feature {image_key!r} is not uint8 images")
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    label_key = "label" if "label" in labels else (labels[0] if labels else None)
    return image_key, label_key


def _check_split(builder: Any, name: str, split: str) -> int:
    try:
        count = builder.info.splits[split].num_examples
    except (KeyError, ValueError):
        raise DataError(
            f"TFDS dataset {name!r} has no split {split!r} (splits: {list(builder.info.splits)}); "
            "set config.data.split or the eval split to one of them"
        ) from None
    if count == 0:
        raise DataError(f"TFDS dataset {name!r}, split {split!r} holds no examples")
    return count


def tfds_source(
    name: str,
    split: str,
    *,
    data_dir: str,
    manual_dir: str,
    training: bool,
    process_index: int,
    process_count: int,
) -> IndexedSource | RecordSource:
    """This process's even slice of `split` (equal sizes when training, all examples otherwise)."""
    tf = import_tensorflow()  # before TFDS touches TF: GPUs must be hidden first
    import tensorflow_datasets as tfds

    builder = _builder(name, data_dir, manual_dir, process_count)
    image_key, label_key = _feature_keys(builder, name)
    global_size = _check_split(builder, name, split)
    local_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count, drop_remainder=training
    )
    length = builder.info.splits[local_split].num_examples
    decoders = {image_key: tfds.decode.SkipDecoding()}  # bytes: our decoder handles bad input
    label_of = (lambda ex: int(ex[label_key])) if label_key else (lambda ex: -1)
    tag = f"tfds:{name}:{split}[{process_index}/{process_count}]"

    if builder.info.file_format == tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
        records = builder.as_data_source(split=local_split, decoders=decoders)

        def read(i: int) -> tuple[bytes, int]:
            example = records[i]
            return example[image_key], label_of(example)

        return IndexedSource(tag, length, read, lambda i: f"{tag}#{i}", global_size)

    def stream(seed: int | None) -> Any:
        options = tf.data.Options()
        options.deterministic = True
        read_config = tfds.ReadConfig(
            options=options, shuffle_seed=seed, add_tfds_id=True, try_autocache=False
        )
        ds = builder.as_dataset(
            split=local_split,
            shuffle_files=seed is not None,
            decoders=decoders,
            read_config=read_config,
        )
        return ds.map(
            lambda ex: (
                ex[image_key],
                tf.cast(ex[label_key], tf.int32) if label_key else tf.constant(-1),
                ex["tfds_id"],
            )
        )

    return RecordSource(tag, length, stream, global_size)
