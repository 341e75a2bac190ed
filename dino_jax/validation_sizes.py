"""Validation of the settings that depend on the data's sizes (listed once the data is
opened, still before the work directory is touched): k-NN banks, probe splits, batches that
the dataset must fill, and the warnings for legitimate but suspicious sizes."""

from __future__ import annotations

import dataclasses

import ml_collections

from dino_jax.config import ConfigError
from dino_jax.validation import config_warnings
from dino_jax.validation_base import Errors


@dataclasses.dataclass(frozen=True)
class DataSizes:
    """Examples (all processes together) of each split a training run reads."""

    train: int
    steps_per_epoch: int
    bank: int | None = None  # data.eval_train_split; None when the run does not evaluate
    test: int | None = None  # data.eval_test_split


def knn_size_errors(v: ml_collections.ConfigDict, data, bank: int, test: int) -> list[str]:
    """eval.* against the sizes of the k-NN bank and test splits (`data`: config.data)."""
    e = Errors()
    e.check(
        test > 0,
        f"data.eval_test_split={data.eval_test_split!r} has no examples: name a split to classify",
    )
    usable = min(bank, v.knn_max_train) if v.knn_max_train else bank
    capped = f", eval.knn_max_train={v.knn_max_train}" if usable < bank else ""
    too_large = sorted({k for k in v.knn_ks if k > usable})
    fitting = sorted({k for k in v.knn_ks if k <= usable}) or [usable]
    e.check(
        not too_large,
        f"eval.knn_ks={tuple(v.knn_ks)}: k = {', '.join(map(str, too_large))}"
        f" {'exceeds' if len(too_large) == 1 else 'exceed'} the k-NN"
        f" bank of {usable} images (data.eval_train_split={data.eval_train_split!r}{capped}): use"
        f" --config.eval.knn_ks={','.join(map(str, fitting))}, or a larger bank",
    )
    return e


def linear_size_errors(lin: ml_collections.ConfigDict, data, train: int, test: int) -> list[str]:
    """linear.* against the sizes of the probe's training and validation splits."""
    e = Errors()
    e.check(
        test > 0,
        f"data.eval_test_split={data.eval_test_split!r} has no examples: name a split to validate",
    )
    e.check(
        lin.batch_size <= train,
        f"linear.batch_size={lin.batch_size} is more than the {train} images of"
        f" data.eval_train_split={data.eval_train_split!r}: lower it (a multiple of the devices)",
    )
    return e


def size_errors(c: ml_collections.ConfigDict, sizes: DataSizes) -> list[str]:
    """Settings that cannot work with the data's sizes."""
    if sizes.bank is None or sizes.test is None:
        return []
    return knn_size_errors(c.eval, c.data, sizes.bank, sizes.test)


def size_warnings(c: ml_collections.ConfigDict, sizes: DataSizes) -> list[str]:
    """Settings that work with the data's sizes but probably not as meant."""
    w = Errors()
    total = c.optim.epochs * sizes.steps_per_epoch
    last = total if c.train.max_steps is None else min(total, c.train.max_steps)
    t = c.train
    w.check(
        t.checkpoint_every_steps <= last,
        f"train.checkpoint_every_steps={t.checkpoint_every_steps} is more than the {last} steps"
        " this run trains: only its final checkpoint is written (a kill before it loses all)",
    )
    w.check(
        t.log_every_steps <= last,
        f"train.log_every_steps={t.log_every_steps} is more than the {last} steps this run"
        " trains: no training metrics are logged",
    )
    if sizes.test is not None:
        w.check(
            c.eval.attention_images <= sizes.test,
            f"eval.attention_images={c.eval.attention_images}: the test split has only"
            f" {sizes.test} images, all of them are drawn",
        )
    return w


def check_sizes(c: ml_collections.ConfigDict, sizes: DataSizes) -> list[str]:
    """ConfigError listing the settings that cannot work with the data's sizes; else the
    warnings (static ones included) for the caller to show."""
    errors = size_errors(c, sizes)
    if errors:
        raise ConfigError("the configuration does not fit the data:\n  - " + "\n  - ".join(errors))
    return config_warnings(c) + size_warnings(c, sizes)
