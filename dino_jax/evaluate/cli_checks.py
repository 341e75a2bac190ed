"""The evaluate command's checks before any feature is computed: options, inputs, split sizes."""

from __future__ import annotations

import os
import zipfile

import numpy as np


def video_size(resize: list[str]) -> int | tuple[int, int] | None:
    """--resize as attention.prepare_image takes it; ValueError if it is none of its forms."""
    if [r.lower() for r in resize] == ["none"]:
        return None
    try:
        sizes = [int(r) for r in resize]
    except ValueError:
        sizes = []
    if not 1 <= len(sizes) <= 2 or min(sizes) < 1:
        raise ValueError(
            f"--resize {' '.join(resize)}: one positive int (the shorter side), two (height"
            " width) or 'none'"
        )
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def video_errors(args) -> list[str]:
    """What is wrong with the video command's options and input, before the weights are
    read: sizes and rates, the input (a folder's images checked, a video's first frame
    decoded) and an output folder that already holds files (stale frames would mix in)."""
    from dino_jax.evaluate.video import input_error

    errors = []
    try:
        video_size(args.resize)
    except ValueError as err:
        errors.append(str(err))
    if args.fps is not None and not args.fps > 0:
        errors.append(f"--fps {args.fps}: a positive frame rate")
    if args.batch_size < 1:
        errors.append(f"--batch_size {args.batch_size}: at least 1")
    errors.append(input_error(args.input))
    if os.path.isdir(args.out) and os.listdir(args.out):
        errors.append(
            f"--out {args.out} is not empty: give a new or empty directory (the frames of an"
            " earlier video would mix with the new ones)"
        )
    return errors


def argument_errors(args) -> list[str]:
    """What is wrong with the options, found before the weights are read: the output
    folders must be (or be creatable as) writable directories, the image an image."""
    from dino_jax.workdir import unusable_reason

    errors = []
    for flag in ("out", "features_dir"):
        path = getattr(args, flag, None)
        if path is not None and not path.strip():
            errors.append(f"--{flag} is empty: name a directory")
        elif path is not None:
            errors.append(unusable_reason(path, f"--{flag}"))
    if args.command == "attention":
        errors.append(image_error(args.image))
        if not 1 <= len(args.image_size) <= 2 or min(args.image_size) < 1:
            errors.append(
                f"--image_size {' '.join(map(str, args.image_size))}: one positive int (the"
                " shorter side) or two (height width)"
            )
    if args.command == "video":
        errors += video_errors(args)
    return [e for e in errors if e]


def image_error(path: str) -> str | None:
    """Why `path` cannot be read as an image (its header and data checked, not decoded), or
    None."""
    from PIL import Image

    if not os.path.isfile(path):
        return f"--image {path}: no such file"
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"--image {path} is not a readable image ({type(err).__name__}: {err})"
    return None


def cached_size(features_dir: str | None, split: str) -> int | None:
    """Rows of the features of `split` saved in `features_dir` (labels read only), or None."""
    path = os.path.join(features_dir, split.replace("/", "_") + ".npz") if features_dir else None
    if not path or not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            return int(saved["labels"].shape[0])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # not one: the data decides
        return None


def size_errors(config, command: str, features_dir: str | None = None) -> list[str]:
    """The settings that cannot work with the sizes of the splits: each split is opened
    (listed) now, before any feature is computed, unless its features are saved already."""
    from dino_jax import validation_sizes as checks
    from dino_jax.data.pipeline import eval_data

    def size(split: str) -> int:
        cached = cached_size(features_dir, split)
        if cached is not None:
            return cached
        return eval_data(config.data, split, config.eval.batch_size).source.global_size

    bank, test = size(config.data.eval_train_split), size(config.data.eval_test_split)
    if command == "knn":
        return checks.knn_size_errors(config.eval, config.data, bank, test)
    return checks.linear_size_errors(config.linear, config.data, bank, test)
