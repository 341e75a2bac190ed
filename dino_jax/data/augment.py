"""DINO's multi-crop augmentation on the accelerator, per sample with typed keys.

Reproduces `DataAugmentationDINO` (main_dino.py of facebookresearch/dino) on images that the
host delivers in the top-left corner of zero-padded L x L uint8 canvases.

Config keys, read from `config.aug` by `MultiCropConfig.from_config` (all required):
  global_size, local_size        crop sides in pixels (224, 96)
  n_global, n_local              number of crops (2; 8 official default, 10 best setting)
  global_scale, local_scale      RandomResizedCrop area fractions ((0.4, 1.0), (0.05, 0.4))
  ratio                          RandomResizedCrop aspect-ratio range ((3/4, 4/3))
  flip_prob                      horizontal flip (0.5)
  jitter_prob                    ColorJitter applied (0.8)
  brightness, contrast, saturation, hue   ColorJitter strengths (0.4, 0.4, 0.2, 0.1)
  grayscale_prob                 RandomGrayscale (0.2)
  global_blur_prob               Gaussian blur per global crop, n_global values ((1.0, 0.1))
  global_solarize_prob           solarization per global crop, n_global values ((0.0, 0.2))
  local_blur_prob                Gaussian blur of each local crop (0.5)
  blur_radius                    PIL GaussianBlur radius range ((0.1, 2.0))
  mean, std                      Normalize per channel, 0-1 scale (ImageNet statistics)
  window                         resample each crop from a static window of the canvas that
                                 holds its box, not the whole canvas (False): the same crops
                                 up to float32 summation order, less work for local crops
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from dino_jax.data import color, crops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
    """Static description of the multi-crop recipe, built from `config.aug` (no defaults of its
    own: dino_jax.config.default_config() holds them; `window`, a speed option that leaves the
    crops as they are, defaults to False so that a description built by hand needs no value)."""

    global_size: int
    local_size: int
    n_global: int
    n_local: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_prob: float
    jitter_prob: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale_prob: float
    global_blur_prob: tuple[float, ...]
    global_solarize_prob: tuple[float, ...]
    local_blur_prob: float
    blur_radius: tuple[float, float]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    window: bool = False

    @classmethod
    def from_config(cls, aug: Any) -> MultiCropConfig:
        """From a `config.aug` section; ValueError listing every unusable value."""
        from dino_jax.validation import aug_errors

        errors = aug_errors(aug, patch_size=None)
        if errors:
            raise ValueError("invalid multi-crop settings:\n  - " + "\n  - ".join(errors))

        def convert(name: str, kind: Any) -> Any:
            if kind in (int, float, bool):
                return kind(aug[name])
            return tuple(float(v) for v in aug[name])

        return cls(**{name: convert(name, kind) for name, kind in _FIELD_TYPES.items()})


_FIELD_TYPES = typing.get_type_hints(MultiCropConfig)


@flax.struct.dataclass
class CropParams:
    """Every random decision for one crop; leading batch/crop axes when sampled in bulk."""

    box: jax.Array  # (4,) int32 top, left, height, width in the valid image
    flip: jax.Array  # bool
    jitter: jax.Array  # bool: ColorJitter applied
    order: jax.Array  # (4,) int32 ColorJitter op order (0 brightness .. 3 hue)
    factors: jax.Array  # (4,) float32 brightness, contrast, saturation, hue
    grayscale: jax.Array  # bool
    blur: jax.Array  # bool
    radius: jax.Array  # float32 blur radius (sigma)
    solarize: jax.Array  # bool


# Uniform draws per crop: the box, then flip, jitter gate, 4 for the op order, 4 factors,
# grayscale, blur gate, blur radius, solarize gate.
PARAM_UNIFORMS = crops.BOX_UNIFORMS + 14


def crop_params_from_uniforms(
    u: jax.Array,
    size_hw: jax.Array,
    cfg: MultiCropConfig,
    scale: Sequence[float],
    blur_prob: jax.Array,
    solarize_prob: jax.Array,
) -> CropParams:
    """One crop's parameters, drawn as the official transforms draw them, from `PARAM_UNIFORMS`
    uniform [0, 1) draws, for an image of `size_hw`.

    One bulk draw per image keeps the compiled graph small (one PRNG call, not one per
    decision); the decisions keep the official distributions.
    """
    box_u, u = u[: crops.BOX_UNIFORMS], u[crops.BOX_UNIFORMS :]
    # torchvision's ranges: [max(0, 1 - x), 1 + x] for the blends, [-x, x] for hue.
    strengths = (cfg.brightness, cfg.contrast, cfg.saturation)
    jitter_lo = jnp.asarray([*(max(0.0, 1.0 - x) for x in strengths), -cfg.hue])
    jitter_hi = jnp.asarray([*(1.0 + x for x in strengths), cfg.hue])
    lo, hi = cfg.blur_radius
    return CropParams(
        box=crops.crop_box_from_uniforms(box_u, size_hw, scale, cfg.ratio),
        flip=u[0] < cfg.flip_prob,
        jitter=u[1] < cfg.jitter_prob,
        # ColorJitter.get_params: a uniformly random op order (the ranks of 4 iid uniforms),
        # then each factor uniform in its range.
        order=jnp.argsort(u[2:6]).astype(jnp.int32),
        factors=jitter_lo + (jitter_hi - jitter_lo) * u[6:10],
        grayscale=u[10] < cfg.grayscale_prob,
        blur=u[11] < blur_prob,
        radius=lo + (hi - lo) * u[12],
        solarize=u[13] < solarize_prob,
    )


def apply_crop(
    image: jax.Array,
    params: CropParams,
    out_size: int,
    cfg: MultiCropConfig,
    dtype: jnp.dtype = jnp.float32,
    window: tuple[int, int] | None = None,
) -> jax.Array:
    """One crop of an (L, L, 3) uint8 canvas -> normalised (out, out, 3) in `dtype`.

    Order of the official pipeline: RandomResizedCrop (bicubic), flip, ColorJitter (p),
    grayscale (p), Gaussian blur (p), solarize (p), ToTensor + Normalize. `window`: the static
    size of the canvas window the resize reads (`crop_window`), None for the whole canvas.
    """
    # Flip commutes with the resize, so it is folded into the column weights.
    x = crops.resized_crop(image, params.box, (out_size, out_size), flip=params.flip, window=window)
    jittered = color.color_jitter(x, params.order, params.factors, hue=cfg.hue > 0.0)
    x = jnp.where(params.jitter, jittered, x)
    x = jnp.where(params.grayscale, color.grayscale(x), x)
    blurred = color.gaussian_blur(x, params.radius, max_sigma=cfg.blur_radius[1])
    x = jnp.where(params.blur, blurred, x)
    x = jnp.where(params.solarize, color.solarize(x), x)
    return color.normalize(x, cfg.mean, cfg.std).astype(dtype)


def multicrop_params(
    keys: jax.Array, sizes: jax.Array, cfg: MultiCropConfig
) -> tuple[CropParams, CropParams]:
    """Per-crop parameters for a batch: leaves (B, n_global, ...) and (B, n_local, ...).

    `keys` (B,) typed keys, one per example; `sizes` (B, 2) valid (height, width).
    """
    global_blur = jnp.asarray(cfg.global_blur_prob, jnp.float32)
    global_solarize = jnp.asarray(cfg.global_solarize_prob, jnp.float32)

    local_blur = jnp.full((cfg.n_local,), cfg.local_blur_prob, jnp.float32)
    local_solarize = jnp.zeros((cfg.n_local,), jnp.float32)
    from_uniforms = jax.vmap(crop_params_from_uniforms, in_axes=(0, None, None, None, 0, 0))

    def per_image(key, size_hw):
        u = jax.random.uniform(key, (cfg.n_global + cfg.n_local, PARAM_UNIFORMS))
        g = from_uniforms(
            u[: cfg.n_global], size_hw, cfg, cfg.global_scale, global_blur, global_solarize
        )
        loc = from_uniforms(
            u[cfg.n_global :], size_hw, cfg, cfg.local_scale, local_blur, local_solarize
        )
        return g, loc

    return jax.vmap(per_image)(keys, sizes)


def crop_window(
    cfg: MultiCropConfig, scale: Sequence[float], canvas_hw: tuple[int, int]
) -> tuple[int, int] | None:
    """The static (height, width) window each crop of a kind (its `scale` range) is resampled
    from with `cfg.window`: the largest box RandomResizedCrop can draw on any image that fits
    the canvas (`crops.max_crop_box`); None (the whole canvas) without `cfg.window`.

    No margin for the bicubic support: the boxes are cut before the resize, so no pixel
    outside a box has a weight. ViT-S/16 from 512^2 canvases: local crops (scale <= 0.4,
    ratio >= 3/4) 374 x 374, global crops (scale up to 1) the whole canvas.
    """
    if not cfg.window:
        return None
    window = crops.max_crop_box(tuple(canvas_hw), tuple(scale), cfg.ratio)
    return None if window == tuple(canvas_hw) else window


def apply_crops(
    images: jax.Array,
    params: CropParams,
    out_size: int,
    cfg: MultiCropConfig,
    dtype: jnp.dtype = jnp.float32,
    window: tuple[int, int] | None = None,
) -> jax.Array:
    """(B, L, L, 3) canvases and (B, n, ...) params -> (B, n, out, out, 3) crops, each read
    from a `window` of its canvas (see `apply_crop`)."""
    crop = functools.partial(apply_crop, out_size=out_size, cfg=cfg, dtype=dtype, window=window)
    # Inner vmap over the crops of one image (shared canvas), outer over the batch.
    return jax.vmap(jax.vmap(crop, in_axes=(None, 0)))(images, params)


def multicrop(
    keys: jax.Array,
    images: jax.Array,
    sizes: jax.Array,
    cfg: MultiCropConfig,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """DINO multi-crop of a batch, all randomness a function of the per-example `keys`.

    images (B, L, L, 3) uint8 canvases, sizes (B, 2) int32 valid (height, width), keys (B,).
    Returns normalised global crops (B, n_global, G, G, 3) and local crops
    (B, n_local, S, S, 3) in `dtype` (bfloat16 for training). With `cfg.window` each kind of
    crop is resampled from a window of the canvas (`crop_window`).
    """
    global_params, local_params = multicrop_params(keys, sizes, cfg)
    canvas_hw = images.shape[1:3]
    global_window = crop_window(cfg, cfg.global_scale, canvas_hw)
    local_window = crop_window(cfg, cfg.local_scale, canvas_hw)
    global_crops = apply_crops(images, global_params, cfg.global_size, cfg, dtype, global_window)
    local_crops = apply_crops(images, local_params, cfg.local_size, cfg, dtype, local_window)
    return global_crops, local_crops
