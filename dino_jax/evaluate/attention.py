"""Self-attention maps of the CLS token in the last block, per head, as arrays and PNG files.

Follows the official visualize_attention.py: resize, cut to whole patches, last-block CLS ->
patch attention, nearest upsampling by the patch size, and masks keeping `threshold` of the mass.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dino_jax.data import color
from dino_jax.models.vit import VisionTransformer

DEFAULT_THRESHOLD = 0.6  # the mass the official README's attention masks keep
DEMO_DISPLAY = 224  # small demo images are upsampled (nearest) to at least this for viewing
# Anchor colours of the heat maps, dark blue -> teal -> green -> yellow (a viridis-like ramp
# so low and high attention stay distinguishable in greyscale too).
_RAMP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32
)


# ----------------------------------------------------------------------------- arrays


def prepare_image(
    image: np.ndarray | Image.Image, image_size: int | Sequence[int] | None, patch_size: int
) -> np.ndarray:
    """uint8 (H, W, 3) resized and cut to whole patches, as visualize_attention.py does.

    `image_size`: an int resizes the shorter side to it (aspect kept, torchvision Resize(int));
    (height, width) resizes to exactly that (the official default is (480, 480)); None keeps
    the size. Then the bottom rows and right columns beyond a multiple of the patch are cut.
    """
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    pil = pil.convert("RGB")
    width, height = pil.size
    if image_size is not None:
        if isinstance(image_size, int) or len(image_size) == 1:
            size = image_size if isinstance(image_size, int) else int(image_size[0])
            short, long = min(height, width), max(height, width)
            # torchvision keeps the longer side as int(size * long / short).
            new_long = int(size * long / short)
            height, width = (size, new_long) if height <= width else (new_long, size)
        else:
            height, width = int(image_size[0]), int(image_size[1])
        # torchvision's Resize on a PIL image is PIL's (antialiased) bilinear.
        pil = pil.resize((width, height), Image.BILINEAR)
    height, width = height - height % patch_size, width - width % patch_size
    if height == 0 or width == 0:
        raise ValueError(f"image {pil.size[::-1]} is smaller than one {patch_size}-px patch")
    return np.asarray(pil)[:height, :width]


@functools.partial(jax.jit, static_argnames=("backbone",))
def cls_attention(
    backbone: VisionTransformer, variables, images: jax.Array, mean: jax.Array, std: jax.Array
) -> jax.Array:
    """uint8 (B, H, W, 3) -> (B, heads, H/p, W/p) last-block CLS -> patch attention."""
    x = color.normalize(images.astype(jnp.float32), mean, std).astype(backbone.dtype)
    out = backbone.apply(variables, x, return_attention=True)
    batch, heads = out.attention.shape[:2]
    p = backbone.patch_size
    rows, cols = images.shape[1] // p, images.shape[2] // p
    # Row 0 is the CLS query; keys 1: are the patches in row-major grid order.
    return out.attention[:, :, 0, 1:].reshape(batch, heads, rows, cols).astype(jnp.float32)


def threshold_masks(maps: np.ndarray, threshold: float) -> np.ndarray:
    """bool masks (..., h, w) keeping per map the fewest patches holding `threshold` of its mass.

    The official algorithm: sort ascending, normalise, cumulative sum, keep where it exceeds
    1 - threshold, then undo the sort. Ties keep their grid order (a stable sort).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold}: a fraction of the attention mass in [0, 1]")
    maps = np.asarray(maps, np.float64)
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1])
    order = np.argsort(flat, axis=-1, kind="stable")
    values = np.take_along_axis(flat, order, axis=-1)
    cum = np.cumsum(values / values.sum(axis=-1, keepdims=True), axis=-1)
    keep_sorted = cum > 1.0 - threshold
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep.reshape(maps.shape)


def upsample(x: np.ndarray, factor: int) -> np.ndarray:
    """Nearest upsampling of the last two axes by an integer factor (interpolate(nearest))."""
    return np.repeat(np.repeat(x, factor, axis=-2), factor, axis=-1)


# ----------------------------------------------------------------------------- pictures


def heatmap(x: np.ndarray) -> np.ndarray:
    """(H, W) -> uint8 (H, W, 3), scaled to its own min..max as plt.imsave does."""
    x = np.asarray(x, np.float32)
    span = float(x.max() - x.min())
    t = (x - x.min()) / span if span > 0 else np.zeros_like(x)
    pos = t * (len(_RAMP) - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    rgb = _RAMP[lo] * (1.0 - frac) + _RAMP[lo + 1] * frac
    return np.round(rgb).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image where the mask is kept, dimmed and tinted elsewhere (uint8 (H, W, 3))."""
    dim = image.astype(np.float32) * 0.25 + np.array([0.0, 0.0, 40.0], np.float32)
    return np.where(mask[..., None], image, np.round(dim)).astype(np.uint8)


def compose(rows: Sequence[Sequence[np.ndarray]], pad: int = 4) -> np.ndarray:
    """Equal-size RGB tiles laid out in rows on a white sheet, `pad` pixels apart."""
    height, width = rows[0][0].shape[:2]
    n_cols = max(len(r) for r in rows)
    sheet = np.full(
        (pad + len(rows) * (height + pad), pad + n_cols * (width + pad), 3), 255, np.uint8
    )
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            top, left = pad + i * (height + pad), pad + j * (width + pad)
            sheet[top : top + height, left : left + width] = tile
    return sheet


def _save_png(path: str, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return path


def save_attention(
    out_dir: str,
    image: np.ndarray,
    maps: np.ndarray,
    patch_size: int,
    threshold: float | None = DEFAULT_THRESHOLD,
    scale: int = 1,
) -> list[str]:
    """Write image.png, attn-head{j}.png, mask-head{j}.png, overview.png and attention.npz.

    `maps`: (heads, h, w) attention of `image` (uint8 (h p, w p, 3)); `scale` enlarges every
    picture by nearest upsampling (for tiny images). Returns the written paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    factor = patch_size * scale
    full = upsample(maps, factor)  # (heads, H s, W s)
    shown = image.repeat(scale, axis=0).repeat(scale, axis=1)
    written = [_save_png(os.path.join(out_dir, "image.png"), shown)]
    tiles = [heatmap(m) for m in full]
    written += [
        _save_png(os.path.join(out_dir, f"attn-head{j}.png"), t) for j, t in enumerate(tiles)
    ]
    rows = [[shown, *tiles]]
    arrays = {"image": image, "attention": maps.astype(np.float32)}
    if threshold is not None:
        masks = threshold_masks(maps, threshold)
        arrays.update(masks=masks, threshold=np.float32(threshold))
        overlays = [overlay(shown, m) for m in upsample(masks, factor)]
        written += [
            _save_png(os.path.join(out_dir, f"mask-head{j}.png"), o) for j, o in enumerate(overlays)
        ]
        rows.append([heatmap(upsample(maps.mean(axis=0), factor)), *overlays])
    written.append(_save_png(os.path.join(out_dir, "overview.png"), compose(rows)))
    path = os.path.join(out_dir, "attention.npz")
    np.savez_compressed(path, **arrays)
    return [*written, path]


# ----------------------------------------------------------------------------- entry points


def attention_of(
    backbone: VisionTransformer, variables, image: np.ndarray, mean, std
) -> np.ndarray:
    """(heads, h, w) attention of one prepared uint8 (H, W, 3) image."""
    maps = cls_attention(
        backbone,
        variables,
        jnp.asarray(image)[None],
        jnp.asarray(mean, jnp.float32),
        jnp.asarray(std, jnp.float32),
    )
    return np.asarray(jax.device_get(maps))[0]


def visualize(
    image_path: str,
    backbone: VisionTransformer,
    variables,
    out_dir: str,
    *,
    mean,
    std,
    image_size: int | Sequence[int] | None = 480,
    threshold: float | None = DEFAULT_THRESHOLD,
) -> list[str]:
    """Attention PNGs of one photo file (any size) in `out_dir`; returns the written paths."""
    with Image.open(image_path) as pil:
        image = prepare_image(pil, image_size, backbone.patch_size)
    maps = attention_of(backbone, variables, image, mean, std)
    return save_attention(out_dir, image, maps, backbone.patch_size, threshold)


def save_demo_attention(config, backbone: VisionTransformer, params, workdir: str) -> list[str]:
    """Attention PNGs of the first `config.eval.attention_images` images of the test split in
    `<workdir>/attention/<i>/`, at the eval crop size, enlarged for viewing."""
    from dino_jax.data.pipeline import eval_data

    n = config.eval.attention_images
    # Every process reads the same first n images (process 0's view of the whole split) and
    # runs the same computation on the replicated params; only process 0 writes.
    data = eval_data(config.data, config.data.eval_test_split, n, process_index=0, process_count=1)
    batch = next(iter(data))
    written = []
    for i in np.flatnonzero(batch["mask"]):
        height, width = batch["size"][i]
        image = prepare_image(
            batch["image"][i, :height, :width], config.eval.crop, backbone.patch_size
        )
        maps = attention_of(backbone, params, image, config.aug.mean, config.aug.std)
        if jax.process_index() == 0:
            scale = max(1, math.ceil(DEMO_DISPLAY / min(image.shape[:2])))
            out = os.path.join(workdir, "attention", f"{i:02d}")
            written += save_attention(out, image, maps, backbone.patch_size, scale=scale)
    return written
