"""Linear probe (official eval_linear.py): a linear classifier trained with SGD on the features
of a frozen backbone over augmented crops; the best validation top-1 over epochs is the result.
"""

from __future__ import annotations

import copy
import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dino_jax import parallel
from dino_jax.data import color, crops
from dino_jax.data.pipeline import device_batches, train_data
from dino_jax.evaluate.features import backbone_features, progress, split_features
from dino_jax.evaluate.probe import (
    LinearResult,
    ProbeState,
    check_linear,
    epoch_record,
    init_probe,
    init_state,
    probe_optimizer,
    probe_update,
    result_of,
)
from dino_jax.models.backbones import vit_depth

_LOG = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- images


def train_transform(images, sizes, key, *, crop: int, scale, mean, std, dtype) -> jax.Array:
    """RandomResizedCrop(crop, scale) + RandomHorizontalFlip + Normalize, per sample.

    The crop is resampled with PIL bicubic (the library's crop kernel); eval_linear.py's
    RandomResizedCrop uses torchvision's default, bilinear.
    """

    def one(image, size_hw, k):
        k_box, k_flip = jax.random.split(k)
        box = crops.sample_crop_box(k_box, size_hw, scale)
        out = crops.resized_crop(image, box, (crop, crop), flip=jax.random.bernoulli(k_flip))
        return color.normalize(out, mean, std)

    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(one)(images, sizes, keys).astype(dtype)


def train_step(
    state: ProbeState,
    variables,
    batch: dict[str, jax.Array],
    base_key: jax.Array,
    *,
    backbone,
    tx,
    num_classes: int,
    crop: int,
    scale: tuple[float, float],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    n_last_blocks: int,
    avgpool: bool,
) -> tuple[ProbeState, dict[str, jax.Array]]:
    """Augment on the device, run the frozen backbone, update the probe."""
    key = jax.random.fold_in(base_key, state.step)
    images = train_transform(
        batch["image"],
        batch["size"],
        key,
        crop=crop,
        scale=scale,
        mean=mean,
        std=std,
        dtype=backbone.dtype,
    )
    feats = backbone_features(backbone, variables, images, n_last_blocks, avgpool)
    labels = batch["label"]
    mask = (labels >= 0) & (labels < num_classes)
    state, loss = probe_update(state, feats, labels, mask, tx=tx)
    return state, {"loss": loss, "out_of_range": jnp.sum(labels >= num_classes)}


def bank_class_count(data_config) -> int:
    """Classes of the probe's training split where the source can tell without reading it (a
    folder's class sub-folders: validation labels are bank indices and may lack the last
    classes), else 0."""
    if data_config.source != "folder":
        return 0
    from dino_jax.data.sources.folder import class_names, folder_root

    return len(class_names(folder_root(data_config.data_dir, data_config.eval_train_split)))


def linear_evaluation(
    config: ml_collections.ConfigDict,
    backbone,
    variables,
    mesh: jax.sharding.Mesh,
) -> LinearResult:
    """The official linear probe of a frozen `backbone`: train on `config.data.eval_train_split`,
    validate on `config.data.eval_test_split` after every `linear.val_every_epochs` epochs
    (the settings are `config.linear`).

    Crops are `config.eval.crop` (train: random-resized; val: resize `config.eval.resize` +
    center crop), normalised with `config.aug.mean/std`. The batch is sharded over `mesh`.
    """
    lin = config.linear
    check_linear(lin, vit_depth(backbone))
    mean, std = tuple(config.aug.mean), tuple(config.aug.std)
    n, avgpool = lin.n_last_blocks, lin.avgpool
    devices = mesh.shape[parallel.DATA_AXIS]
    if lin.batch_size % devices:
        raise ValueError(f"linear.batch_size={lin.batch_size}: use a multiple of {devices} devices")
    replicated = parallel.replicated(mesh)
    variables = jax.device_put(variables, replicated)

    # The backbone is frozen and the val transform deterministic: val features once, not per
    # epoch, give the same scores.
    val_x, val_y = split_features(
        config,
        backbone,
        variables,
        mesh,
        config.data.eval_test_split,
        n_last_blocks=n,
        avgpool=avgpool,
        show_progress=True,
    )
    num_classes = lin.num_classes or max(int(val_y.max()) + 1, bank_class_count(config.data))
    dim = val_x.shape[1]

    data_config = copy.deepcopy(config.data)
    data_config.split = config.data.eval_train_split
    data = train_data(data_config, lin.batch_size)
    steps = lin.steps_per_epoch or data.steps_per_epoch
    tx, schedule = probe_optimizer(lin, steps)
    key = jax.random.key(lin.seed)
    state = jax.device_put(init_state(init_probe(key, dim, num_classes), tx), replicated)
    step_fn = jax.jit(
        functools.partial(
            train_step,
            backbone=backbone,
            tx=tx,
            num_classes=num_classes,
            crop=config.eval.crop,
            scale=tuple(lin.crop_scale),
            mean=mean,
            std=std,
            n_last_blocks=n,
            avgpool=avgpool,
        ),
        in_shardings=(replicated, replicated, parallel.batch_sharding(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    _LOG.info(
        "linear probe: %d features, %d classes, %d epochs of %d steps at batch %d",
        dim,
        num_classes,
        lin.epochs,
        steps,
        lin.batch_size,
    )
    stream = device_batches(iter(data), mesh, config.data.prefetch)
    base_key = jax.random.fold_in(key, 1)
    history = []
    bar = progress(None, total=lin.epochs * steps, desc="linear probe")
    for epoch in range(lin.epochs):
        losses, stray = [], []
        for _ in range(steps):
            state, out = step_fn(state, variables, next(stream), base_key)
            losses.append(out["loss"])  # fetched at the end of the epoch: no per-step sync
            stray.append(out["out_of_range"])
            bar.update()
        if int(np.sum(jax.device_get(stray))):
            raise ValueError(
                f"training labels reach beyond the {num_classes} classes seen in validation:"
                " set linear.num_classes"
            )
        record = epoch_record(lin, epoch, schedule, steps, losses, state, val_x, val_y)
        history.append(record)
        if "val/top1" in record:
            top1, loss = record["val/top1"], record["train/loss"]
            bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", top1=f"{top1:.2f}")
            _LOG.info("epoch %d: train loss %.4f, val top-1 %.2f", epoch, loss, top1)
    bar.close()
    return result_of(history, state, dim, num_classes)
