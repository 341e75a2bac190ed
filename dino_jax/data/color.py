"""Photometric ops with torchvision-on-PIL semantics on float32 HWC images holding 8-bit values.

Each op rounds or truncates its result to 0..255 integers exactly where PIL writes 8-bit pixels.
"""

from __future__ import annotations

import math

import dm_pix as pix
import jax
import jax.numpy as jnp

# PIL's convert("L") luma (ITU-R 601-2) in its 16-bit fixed-point form: (19595, 38470, 7471) / 2^16.
LUMA = (19595.0 / 65536.0, 38470.0 / 65536.0, 7471.0 / 65536.0)
# ColorJitter's op indices, as torchvision's `fn_idx`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
# PIL's GaussianBlur is three passes of an extended box blur per axis.
BLUR_PASSES = 3
# Slack before truncating float HSV to PIL's 8-bit grid, so that float32 rounding does not drop
# exact grid values a level: above float32 error at 255, below the 1/1530 by which an 8-bit
# input's hue (denominator 6 * chroma) can miss the grid.
_HSV_SLACK = 2e-4


def _clip(image: jax.Array) -> jax.Array:
    return jnp.clip(image, 0.0, 255.0)


def round8(image: jax.Array) -> jax.Array:
    """Round half up into 0..255, as PIL's fixed-point filters store their 8-bit results."""
    return jnp.floor(_clip(image) + 0.5)


def luma(image: jax.Array) -> jax.Array:
    """(..., H, W, 3) -> (..., H, W, 1) PIL `convert("L")` grey level, rounded like PIL."""
    # The weighted sum of 8-bit values in 1/2^16 units stays below 2^24, so float32 is exact.
    # Written per channel: a size-3 minor-axis reduction is slow on some backends.
    wr, wg, wb = (w * 65536.0 for w in LUMA)
    total = wr * image[..., 0:1] + wg * image[..., 1:2] + wb * image[..., 2:3]
    return jnp.floor((total + 32768.0) / 65536.0)


def grayscale(image: jax.Array) -> jax.Array:
    """`rgb_to_grayscale(img, num_output_channels=3)`: luma replicated to 3 channels."""
    return jnp.broadcast_to(luma(image), image.shape)


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    # PIL's Image.blend(degenerate, image, factor), what ImageEnhance does: clip, then truncate
    # towards zero into 8 bits.
    return jnp.floor(_clip(degenerate + factor * (image - degenerate)))


def _contrast_degenerate(image: jax.Array) -> jax.Array:
    # ImageEnhance.Contrast blends with a constant image at the mean grey level, rounded; the
    # mean is over the whole of this one HWC image.
    grey = luma(image).reshape(-1)
    # The sum as a dot with ones: XLA:CPU reduces this fused producer ~30x slower. Exact at any
    # matmul precision, since 8-bit values are exact even in bfloat16.
    total = jnp.dot(grey, jnp.ones_like(grey), precision=jax.lax.Precision.HIGHEST)
    return jnp.floor(total / grey.size + 0.5)


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    """Multiply by `factor` (blend with black); dm-pix's adjust_brightness adds instead."""
    return _blend(0.0, image, factor)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """Blend with the (rounded) mean of the grayscale image."""
    return _blend(_contrast_degenerate(image), image, factor)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    """Blend with the grayscale image."""
    return _blend(luma(image), image, factor)


def adjust_hue(image: jax.Array, factor: jax.Array) -> jax.Array:
    """Rotate hue by `factor` turns in PIL's 8-bit HSV, as torchvision does for PIL images.

    PIL stores H and S truncated to 8 bits (H in 1/255 turns), torchvision adds
    uint8(factor * 255) to H with uint8 wrap-around, and PIL rounds the RGB it converts back;
    these quantisations are reproduced around dm-pix's HSV conversions.
    """
    hsv = pix.rgb_to_hsv(image / 255.0)
    hue = jnp.floor(hsv[..., 0] * 255.0 + _HSV_SLACK)
    sat = jnp.floor(hsv[..., 1] * 255.0 + _HSV_SLACK) / 255.0
    shift = jnp.mod(jnp.trunc(factor * 255.0), 256.0)
    hue = jnp.mod(hue + shift, 256.0) / 255.0
    rgb = pix.hsv_to_rgb(jnp.stack([hue, sat, hsv[..., 2]], axis=-1))
    return round8(rgb * 255.0)


def _jitter_blend(image: jax.Array, op: jax.Array, factor: jax.Array) -> jax.Array:
    # Brightness, contrast and saturation are all blends, with black, the mean grey or the
    # grey image: one blend with the selected degenerate image does any of them.
    degenerate = jnp.where(
        op == BRIGHTNESS,
        0.0,
        jnp.where(op == CONTRAST, _contrast_degenerate(image), luma(image)),
    )
    return _blend(degenerate, image, factor)


def color_jitter(
    image: jax.Array,
    order: jax.Array,
    factors: jax.Array,
    *,
    hue: bool = True,
) -> jax.Array:
    """ColorJitter's four ops applied in `order` (a permutation of 0..3, torchvision's fn_idx).

    `factors` = (brightness, contrast, saturation, hue). `hue=False` skips the hue op
    (ColorJitter with hue = 0 never calls adjust_hue).
    """
    if not hue:
        for i in range(4):
            op = order[i]
            blended = _jitter_blend(image, op, factors[jnp.minimum(op, SATURATION)])
            image = jnp.where(op == HUE, image, blended)
        return image
    # The hue op, the costly one, runs once: up to three blends before it (the ops ahead of
    # it in `order`), then up to three after it; the unused slots leave the image as is.
    hue_pos = jnp.argmax(order == HUE)
    for i in range(3):
        op = order[i]
        blended = _jitter_blend(image, op, factors[jnp.minimum(op, SATURATION)])
        image = jnp.where(i < hue_pos, blended, image)
    image = adjust_hue(image, factors[HUE])
    for i in range(3):
        slot = hue_pos + 1 + i
        op = order[jnp.minimum(slot, 3)]
        blended = _jitter_blend(image, op, factors[jnp.minimum(op, SATURATION)])
        image = jnp.where(slot <= 3, blended, image)
    return image


def pil_box_radius(sigma: jax.Array, passes: int = BLUR_PASSES) -> jax.Array:
    """Extended box radius l + a whose `passes`-fold box blur has variance sigma^2 (PIL)."""
    var = sigma * sigma / passes
    length = jnp.sqrt(12.0 * var + 1.0)
    whole = jnp.floor((length - 1.0) / 2.0)
    frac = (2.0 * whole + 1.0) * (whole * (whole + 1.0) - 3.0 * var)
    frac = frac / (6.0 * (var - (whole + 1.0) ** 2))
    return whole + frac


def blur_taps(max_sigma: float, passes: int = BLUR_PASSES) -> int:
    """Half-width of the box kernel needed for radii up to `max_sigma` (static)."""
    var = max_sigma * max_sigma / passes
    return math.floor((math.sqrt(12.0 * var + 1.0) - 1.0) / 2.0) + 1


def _box_kernel(radius: jax.Array, taps: int) -> jax.Array:
    """PIL's fixed-point box weights in units of 2^-24 over offsets -taps..taps (uint32)."""
    whole = jnp.floor(radius)
    # PIL: ww = (UINT32)(2^24 / (2r + 1)) in float32, fw = (2^24 - (2l + 1) ww) / 2, so the
    # fractional radius weighs the two outermost taps with what the inner ones leave.
    inner = jnp.floor(float(1 << 24) / (2.0 * radius + 1.0)).astype(jnp.uint32)
    count = (2.0 * whole + 1.0).astype(jnp.uint32)
    edge = (jnp.uint32(1 << 24) - count * inner) // 2
    offset = jnp.abs(jnp.arange(-taps, taps + 1, dtype=jnp.float32))
    zero = jnp.uint32(0)
    return jnp.where(offset <= whole, inner, jnp.where(offset == whole + 1.0, edge, zero))


def _box_pass(image: jax.Array, kernel: jax.Array, axis: int) -> jax.Array:
    taps = (kernel.shape[0] - 1) // 2
    size = image.shape[axis]
    pad = [(0, 0)] * image.ndim
    pad[axis] = (taps, taps)
    # PIL's box blur repeats the edge pixel beyond the border.
    padded = jnp.pad(image, pad, mode="edge")
    acc = jnp.zeros(image.shape, jnp.uint32)
    for k in range(kernel.shape[0]):
        acc = acc + kernel[k] * jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
    # 8-bit values times weights summing to 2^24 stay below 2^32: exact in uint32. Each pass
    # is written back to an 8-bit image, rounded half up.
    return (acc + jnp.uint32(1 << 23)) >> 24


def gaussian_blur(image: jax.Array, sigma: jax.Array, max_sigma: float = 2.0) -> jax.Array:
    """`img.filter(ImageFilter.GaussianBlur(radius=sigma))`: PIL's 3-pass extended box blur.

    Horizontal passes first, then vertical, with edge replication and PIL's fixed-point
    arithmetic (bit-exact on 8-bit input). `max_sigma` (static) bounds `sigma` and sets the
    kernel width.
    """
    kernel = _box_kernel(pil_box_radius(jnp.asarray(sigma, jnp.float32)), blur_taps(max_sigma))
    pixels = round8(image).astype(jnp.uint32)
    for axis in (-2, -3):
        pixels = jax.lax.fori_loop(
            0, BLUR_PASSES, lambda _, p, axis=axis: _box_pass(p, kernel, axis), pixels
        )
    return pixels.astype(jnp.float32)


def solarize(image: jax.Array, threshold: float = 128.0) -> jax.Array:
    """`ImageOps.solarize(img, 128)`: pixels >= threshold become 255 - v."""
    return jnp.where(image >= threshold, 255.0 - image, image)


def normalize(image: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """ToTensor (scale to [0, 1]) then Normalize(mean, std), per channel."""
    return (image / 255.0 - jnp.asarray(mean, image.dtype)) / jnp.asarray(std, image.dtype)
