"""Validation of the evaluation sections: config.eval (k-NN) and config.linear (linear probe)."""

from __future__ import annotations

import math

import ml_collections
import numpy as np

from dino_jax.validation_base import Errors, seed_error

# The k-NN weights exp(similarity / T) of similarities up to 1 overflow float32 below this T,
# and the accuracies come out wrong without any error.
KNN_MIN_TEMPERATURE = 1.0 / math.log(float(np.finfo(np.float32).max))


def eval_errors(v: ml_collections.ConfigDict, patch_size, num_devices: int) -> list[str]:
    e = Errors()
    e.check(v.knn_every_epochs >= 0, "eval.knn_every_epochs must be >= 0 (0: end only)")
    e.check(
        len(v.knn_ks) > 0 and all(isinstance(k, int) and k > 0 for k in v.knn_ks),
        f"eval.knn_ks={v.knn_ks}: one or more positive ints (official 10,20,100,200)",
    )
    e.check(
        v.knn_temperature >= KNN_MIN_TEMPERATURE,
        f"eval.knn_temperature={v.knn_temperature}: use at least {KNN_MIN_TEMPERATURE:.4f} (below,"
        " the neighbour weights exp(similarity / T) overflow float32; official 0.07)",
    )
    e.positive_int("eval.resize", v.resize)
    e.positive_int("eval.crop", v.crop)
    e.check(v.knn_max_train >= 0, "eval.knn_max_train must be >= 0 (0: the whole split)")
    e.check(v.attention_images >= 0, "eval.attention_images must be >= 0")
    e.check(v.crop <= v.resize, f"eval.crop={v.crop} is larger than eval.resize={v.resize}")
    if isinstance(patch_size, int) and patch_size > 0:
        e.check(
            v.crop % patch_size == 0,
            f"eval.crop={v.crop} is not a multiple of model.patch_size={patch_size}",
        )
    e.positive_int("eval.batch_size", v.batch_size)
    e.splits_over_devices("eval.batch_size", v.batch_size, num_devices)
    return e


def linear_errors(lin: ml_collections.ConfigDict, depth: int | None = None) -> list[str]:
    """The linear probe's settings; `depth`: the probed backbone's, when known."""
    seed = seed_error("linear.seed", lin.seed)
    return ([seed] if seed else []) + [
        f"linear.{key}={lin[key]!r}: {need}"
        for key, ok, need in [
            ("epochs", lin.epochs >= 1, "at least 1"),
            ("lr", lin.lr > 0, "must be > 0"),
            ("batch_size", lin.batch_size >= 1, "at least 1"),
            ("momentum", 0 <= lin.momentum < 1, "in [0, 1)"),
            (
                "n_last_blocks",
                1 <= lin.n_last_blocks <= (depth or lin.n_last_blocks),
                f"in [1, depth={depth}]",
            ),
            (
                "crop_scale",
                len(lin.crop_scale) == 2 and 0 < lin.crop_scale[0] <= lin.crop_scale[1] <= 1,
                "0 < lo <= hi <= 1",
            ),
            ("val_every_epochs", lin.val_every_epochs >= 1, "at least 1"),
            ("steps_per_epoch", lin.steps_per_epoch >= 0, ">= 0 (0: the whole split)"),
            ("num_classes", lin.num_classes >= 0, ">= 0 (0: from the labels)"),
        ]
        if not ok
    ]
