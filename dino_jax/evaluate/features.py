"""Backbone features of a whole split: the eval transform on the device, then the ViT.

The eval transform is the official one (Resize(resize, bicubic) on the shorter side, then
CenterCrop(crop), ToTensor, Normalize), done as one PIL-bicubic resample per image from the
host's canvas. Features are the backbone's (a ViT's final-norm CLS token, a ResNet's pooled
output), or a ViT's linear-probe features (CLS of the last n blocks, optionally with the mean
patch token).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from dino_jax import parallel
from dino_jax.data import color, crops
from dino_jax.data.pipeline import device_batches, eval_data
from dino_jax.models.backbones import is_vit


def eval_transform(
    images: jax.Array, sizes: jax.Array, *, resize: int, crop: int, mean, std, dtype
) -> jax.Array:
    """(B, L, L, 3) uint8 canvases -> (B, crop, crop, 3) normalised center crops."""

    def one(image, size_hw):
        box = crops.resize_center_crop_box(size_hw, resize, crop)
        within = jnp.stack([0.0, 0.0, size_hw[0], size_hw[1]]).astype(jnp.float32)
        out = crops.resized_crop(image, box, (crop, crop), within=within)
        return color.normalize(out, mean, std)

    return jax.vmap(one)(images, sizes).astype(dtype)


def linear_features(out, n_last_blocks: int, avgpool: bool) -> jax.Array:
    """eval_linear.py's features: CLS of the last n normed blocks [+ mean patch token]. Every
    ViT's intermediates are (B, 1 + N, D), CLS then patches: DINOv2's registers and DINOv3's
    storage tokens are left out, so the mean is over patch tokens only."""
    feats = [block[:, 0] for block in out.intermediates]
    if avgpool:
        feats.append(out.intermediates[-1][:, 1:].mean(axis=1))
    return jnp.concatenate(feats, axis=-1)


def backbone_features(
    backbone, variables, images: jax.Array, n_last_blocks: int = 0, avgpool: bool = False
) -> jax.Array:
    """Float32 features of a frozen backbone (BatchNorm with its running statistics): a ViT's
    CLS token, or its linear-probe features with `n_last_blocks`; a ResNet's or XCiT's
    output, as eval_linear.py and eval_knn.py take it for those (n_last_blocks unused)."""
    if n_last_blocks and is_vit(backbone):
        out = backbone.apply(variables, images, n_last_blocks=n_last_blocks)
        return linear_features(out, n_last_blocks, avgpool).astype(jnp.float32)
    return backbone.apply(variables, images).feature.astype(jnp.float32)


@functools.lru_cache(maxsize=8)  # one compilation per setting, not per call
def feature_fn(
    backbone,
    mesh: jax.sharding.Mesh,
    *,
    resize: int,
    crop: int,
    mean,
    std,
    n_last_blocks: int = 0,
    avgpool: bool = False,
):
    """jit(params, batch) -> (B, D') features, batch sharded over the mesh."""

    def features(params, batch):
        images = eval_transform(
            batch["image"],
            batch["size"],
            resize=resize,
            crop=crop,
            mean=mean,
            std=std,
            dtype=backbone.dtype,
        )
        return backbone_features(backbone, params, images, n_last_blocks, avgpool)

    data = parallel.batch_sharding(mesh)
    return jax.jit(features, in_shardings=(parallel.replicated(mesh), data), out_shardings=data)


def extract(
    fn, params, batches: Iterable[dict[str, np.ndarray]], mesh: jax.sharding.Mesh
) -> tuple[np.ndarray, np.ndarray]:
    """All (features, labels) of a split, padding dropped, on every process's host.

    A batch's features are fetched while the next batch is computed."""
    feats, labels = [], []

    def collect(out, batch):
        mask = _gather(batch["mask"]).astype(bool)
        feats.append(_gather(out)[mask])
        labels.append(_gather(batch["label"])[mask])

    pending = None
    for batch in device_batches(batches, mesh):
        out = fn(params, {"image": batch["image"], "size": batch["size"]})
        if pending is not None:
            collect(*pending)
        pending = (out, batch)
    if pending is not None:
        collect(*pending)
    return np.concatenate(feats), np.concatenate(labels)


def split_features(
    config: ml_collections.ConfigDict,
    backbone,
    params,
    mesh: jax.sharding.Mesh,
    split: str,
    *,
    n_last_blocks: int = 0,
    avgpool: bool = False,
    batch_size: int | None = None,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of `split` through the eval transform of `config` (CLS features, or
    the linear-probe ones with `n_last_blocks`); batches of `config.eval.batch_size` unless
    `batch_size` is given (rounded up to fill the mesh); `show_progress`: a bar."""
    fn = feature_fn(
        backbone,
        mesh,
        resize=config.eval.resize,
        crop=config.eval.crop,
        mean=tuple(config.aug.mean),
        std=tuple(config.aug.std),
        n_last_blocks=n_last_blocks,
        avgpool=avgpool,
    )
    # eval batches are padded and masked: any size can be rounded up to fill the mesh
    size = parallel.round_up(batch_size or config.eval.batch_size, mesh)
    batches = eval_data(config.data, split, size)
    if show_progress:
        batches = progress(batches, total=batches.num_batches, desc=f"features {split}")
    return extract(fn, params, batches, mesh)


def progress(iterable, **kw):
    """A tqdm bar on process 0 that disappears when done."""
    return tqdm(iterable, disable=jax.process_index() != 0, leave=False, **kw)


def _gather(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
