"""DINO's multi-crop augmentation on the accelerator, per sample with typed keys.

Reproduces `DataAugmentationDINO` (RECIPE.md, "Data augmentation") on images that the host
delivers in the top-left corner of zero-padded L x L uint8 canvases.

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
"""

from __future__ import annotations

import dataclasses
import functools
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
    """Static description of the multi-crop recipe; defaults are the official ViT-S/16 run."""

    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = crops.DEFAULT_RATIO
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    global_blur_prob: tuple[float, ...] = (1.0, 0.1)
    global_solarize_prob: tuple[float, ...] = (0.0, 0.2)
    local_blur_prob: float = 0.5
    blur_radius: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        for name in ("global_size", "local_size", "n_global"):
            if getattr(self, name) < 1:
                raise ValueError(f"aug.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_local < 0:
            raise ValueError(f"aug.n_local must be >= 0, got {self.n_local}")
        for name in ("global_scale", "local_scale"):
            lo, hi = _pair(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"aug.{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        lo, hi = _pair(self, "ratio")
        if not 0.0 < lo <= hi:
            raise ValueError(f"aug.ratio must satisfy 0 < min <= max, got {(lo, hi)}")
        lo, hi = _pair(self, "blur_radius")
        if not 0.0 <= lo <= hi:
            raise ValueError(f"aug.blur_radius must satisfy 0 <= min <= max, got {(lo, hi)}")
        probs = {
            name: getattr(self, name)
            for name in ("flip_prob", "jitter_prob", "grayscale_prob", "local_blur_prob")
        }
        for name in ("global_blur_prob", "global_solarize_prob"):
            values = getattr(self, name)
            if len(values) != self.n_global:
                raise ValueError(
                    f"aug.{name} needs one value per global crop (n_global = {self.n_global}), "
                    f"got {values}"
                )
            probs.update({f"{name}[{i}]": p for i, p in enumerate(values)})
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"aug.{name} is a probability, must be in [0, 1], got {p}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"aug.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"aug.hue must be in [0, 0.5], got {self.hue}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"aug.mean and aug.std need 3 values, got {self.mean}, {self.std}")
        if min(self.std) <= 0.0:
            raise ValueError(f"aug.std must be positive, got {self.std}")

    @classmethod
    def from_config(cls, aug: Any) -> MultiCropConfig:
        """From the `config.aug` ConfigDict; every key listed in the module docstring."""

        def convert(field: dataclasses.Field) -> Any:
            kind = _floats if isinstance(field.default, tuple) else type(field.default)
            return kind(aug[field.name])

        return cls(**{f.name: convert(f) for f in dataclasses.fields(cls)})


def _floats(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _pair(cfg: MultiCropConfig, name: str) -> tuple[float, float]:
    values = getattr(cfg, name)
    if len(values) != 2:
        raise ValueError(f"aug.{name} needs two values (min, max), got {values}")
    return float(values[0]), float(values[1])


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
) -> jax.Array:
    """One crop of an (L, L, 3) uint8 canvas -> normalised (out, out, 3) in `dtype`.

    Order of the official pipeline: RandomResizedCrop (bicubic), flip, ColorJitter (p),
    grayscale (p), Gaussian blur (p), solarize (p), ToTensor + Normalize.
    """
    # Flip commutes with the resize, so it is folded into the column weights.
    x = crops.resized_crop(image, params.box, (out_size, out_size), flip=params.flip)
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


def apply_crops(
    images: jax.Array,
    params: CropParams,
    out_size: int,
    cfg: MultiCropConfig,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """(B, L, L, 3) canvases and (B, n, ...) params -> (B, n, out, out, 3) crops."""
    crop = functools.partial(apply_crop, out_size=out_size, cfg=cfg, dtype=dtype)
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
    (B, n_local, S, S, 3) in `dtype` (bfloat16 for training).
    """
    global_params, local_params = multicrop_params(keys, sizes, cfg)
    global_crops = apply_crops(images, global_params, cfg.global_size, cfg, dtype)
    local_crops = apply_crops(images, local_params, cfg.local_size, cfg, dtype)
    return global_crops, local_crops
