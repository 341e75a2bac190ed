"""k-NN evaluation of a backbone on the configured splits (during training and after)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from dino_jax.data.sources import DataError, check_eval_classes
from dino_jax.evaluate.features import split_features
from dino_jax.evaluate.knn import knn_classify, normalize
from dino_jax.models.vit import VisionTransformer

_LOG = logging.getLogger(__name__)
HEADLINE_K = 20  # the official headline figure


def knn_metrics(config: ml_collections.ConfigDict, train, test, mesh) -> dict[str, float]:
    """The configured weighted k-NN on (features, labels) pairs: `knn/top1_k<k>`,
    `knn/top5_k<k>` for every k, and `knn/top1`, `knn/top5` at k = 20 (official headline)."""
    (train_x, train_y), (test_x, test_y) = train, test
    check_labelled(config, train_y, test_y)
    limit = config.eval.knn_max_train
    if limit and len(train_x) > limit:
        train_x, train_y = train_x[:limit], train_y[:limit]
    result = knn_classify(
        normalize(train_x),
        train_y,
        normalize(test_x),
        test_y,
        ks=tuple(config.eval.knn_ks),
        temperature=config.eval.knn_temperature,
        mesh=mesh,
        per_sample=False,
    )
    metrics = result.metrics()
    k = HEADLINE_K if HEADLINE_K in result.per_k else min(result.per_k)
    metrics["knn/top1"] = result.per_k[k].top1
    metrics["knn/top5"] = result.per_k[k].top5
    _LOG.info(
        "k-NN (k=%d) top-1 %.2f top-5 %.2f on %d queries, bank %d",
        k,
        metrics["knn/top1"],
        metrics["knn/top5"],
        len(test_x),
        len(train_x),
    )
    return metrics


def check_labelled(config: ml_collections.ConfigDict, train_y, test_y) -> None:
    """DataError unless both splits have labelled examples (all of them unreadable, or a
    source without labels, would give a meaningless or failing k-NN)."""
    splits = (
        ("bank", config.data.eval_train_split, train_y),
        ("test", config.data.eval_test_split, test_y),
    )
    for what, split, labels in splits:
        labels = np.asarray(labels)
        if not len(labels):
            raise DataError(
                f"no image of the k-NN {what} split {split!r} could be read (see the skipped"
                " files): k-NN evaluation needs images in both splits"
            )
        if not (labels >= 0).any():
            raise DataError(
                f"the k-NN {what} split {split!r} has no labels (a flat folder, or a dataset"
                " without a class label): k-NN evaluation needs labelled splits"
            )


def knn_evaluation(
    config: ml_collections.ConfigDict,
    backbone: VisionTransformer,
    params,
    mesh: jax.sharding.Mesh,
    features: Callable[[str], tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, float]:
    """k-NN of `backbone` features: bank = eval_train_split, queries = eval_test_split.

    `features(split)` gives a split's (features, labels); default: extracted by split_features
    (the command line passes one that reads and writes a feature cache). Splits whose class
    names disagree are refused (DataError) before any feature is computed."""
    start = time.perf_counter()
    check_eval_classes(config.data)
    if features is None:
        features = functools.partial(split_features, config, backbone, params, mesh)
    train, test = (features(s) for s in (config.data.eval_train_split, config.data.eval_test_split))
    metrics = knn_metrics(config, train, test, mesh)
    metrics["knn/seconds"] = time.perf_counter() - start
    return metrics
