"""Random-resized-crop boxes and PIL-bicubic resized crops as per-sample weight matrices."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# torchvision RandomResizedCrop's default aspect-ratio range: DataAugmentationDINO
# (main_dino.py) passes no `ratio`.
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# torchvision tries this many (area, ratio) draws before falling back to a central crop.
RRC_TRIES = 10
# PIL's bicubic filter: Keys cubic with a = -0.5 and a support of 2 source pixels.
_PIL_CUBIC_A = -0.5
_PIL_CUBIC_SUPPORT = 2.0


# Uniform draws one crop box consumes: an area and a log-ratio per try, then top and left.
BOX_UNIFORMS = 2 * RRC_TRIES + 2
# Relative slack of `max_crop_box`'s bound, above the float32 rounding of the traced box
# arithmetic (a few ulps, ~1e-6) so that the static bound can never be beaten by a traced box.
_BOUND_SLACK = 1e-5


def sample_crop_box(
    key: jax.Array,
    size_hw: jax.Array,
    scale: Sequence[float],
    ratio: Sequence[float] = DEFAULT_RATIO,
) -> jax.Array:
    """torchvision `RandomResizedCrop.get_params` on a (height, width) image.

    Returns int32 (top, left, height, width); see `crop_box_from_uniforms`.
    """
    return crop_box_from_uniforms(jax.random.uniform(key, (BOX_UNIFORMS,)), size_hw, scale, ratio)


def crop_box_from_uniforms(
    u: jax.Array,
    size_hw: jax.Array,
    scale: Sequence[float],
    ratio: Sequence[float] = DEFAULT_RATIO,
) -> jax.Array:
    """`RandomResizedCrop.get_params` driven by `BOX_UNIFORMS` uniform [0, 1) draws.

    All `RRC_TRIES` (area, ratio) draws are made at once and the first that fits is kept,
    which has the distribution of torchvision's early-exit loop.
    """
    height = jnp.maximum(size_hw[0].astype(jnp.int32), 1)
    width = jnp.maximum(size_hw[1].astype(jnp.int32), 1)
    h_f, w_f = height.astype(jnp.float32), width.astype(jnp.float32)
    area_u, ratio_u = u[:RRC_TRIES], u[RRC_TRIES : 2 * RRC_TRIES]
    top_u, left_u = u[2 * RRC_TRIES], u[2 * RRC_TRIES + 1]
    target = h_f * w_f * (scale[0] + (scale[1] - scale[0]) * area_u)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * ratio_u)
    # jnp.round rounds half to even, like Python's round() in torchvision.
    crop_w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    crop_h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = jnp.argmax(fits)
    found = jnp.any(fits)

    fb_top, fb_left, fb_h, fb_w = _fallback_box(height, width, ratio)
    box_h = jnp.where(found, crop_h[first], fb_h)
    box_w = jnp.where(found, crop_w[first], fb_w)
    # randint(0, H - h + 1): torchvision places an accepted box uniformly.
    top = jnp.where(found, _randint(top_u, height - box_h + 1), fb_top)
    left = jnp.where(found, _randint(left_u, width - box_w + 1), fb_left)
    return jnp.stack([top, left, box_h, box_w]).astype(jnp.int32)


def _randint(u: jax.Array, n: jax.Array) -> jax.Array:
    # Uniform integer in [0, n) from a uniform [0, 1) draw; min() guards float rounding at 1.
    return jnp.minimum(jnp.floor(u * n.astype(jnp.float32)).astype(jnp.int32), n - 1)


def _fallback_box(
    height: jax.Array, width: jax.Array, ratio: Sequence[float]
) -> tuple[jax.Array, ...]:
    """torchvision's fallback: the central crop with its aspect ratio clamped to `ratio`."""
    lo, hi = min(ratio), max(ratio)
    in_ratio = width.astype(jnp.float32) / height.astype(jnp.float32)
    too_tall = in_ratio < lo
    too_wide = in_ratio > hi
    tall_h = jnp.round(width.astype(jnp.float32) / lo).astype(jnp.int32)
    wide_w = jnp.round(height.astype(jnp.float32) * hi).astype(jnp.int32)
    box_h = jnp.where(too_tall, tall_h, height)
    box_w = jnp.where(too_wide, wide_w, width)
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def pil_cubic(x: jax.Array) -> jax.Array:
    """PIL's bicubic kernel (a = -0.5), zero beyond |x| >= 2."""
    a = _PIL_CUBIC_A
    x = jnp.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def axis_weights(
    start: jax.Array,
    length: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    in_size: int,
    out_size: int,
) -> jax.Array:
    """(out_size, in_size) weights of PIL's bicubic resample of [start, start + length).

    As PIL's `precompute_coeffs`: output o is centred at start + (o + 0.5) * scale, the kernel
    is stretched by max(scale, 1) (antialiasing when shrinking), and the weights are normalised
    over the source pixels that exist, here the pixels i with lo <= i < hi.
    """
    start, length = jnp.asarray(start, jnp.float32), jnp.asarray(length, jnp.float32)
    scale = length / out_size
    stretch = jnp.maximum(scale, 1.0)
    centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale  # (out,)
    pixel = jnp.arange(in_size, dtype=jnp.float32)  # (in,)
    weights = pil_cubic((pixel[None, :] + 0.5 - centre[:, None]) / stretch)
    weights = jnp.where((pixel >= lo) & (pixel < hi), weights, 0.0)
    total = jnp.sum(weights, axis=1, keepdims=True)
    return weights / jnp.where(total == 0.0, 1.0, total)


def resized_crop(
    image: jax.Array,
    box: jax.Array,
    out_hw: tuple[int, int],
    *,
    within: jax.Array | None = None,
    flip: jax.Array | bool = False,
    precision: jax.lax.PrecisionLike = None,
    window: tuple[int, int] | None = None,
) -> jax.Array:
    """PIL-bicubic resize of `box` = (top, left, height, width) of an HWC image to `out_hw`.

    Returns float32 holding the 0..255 integers PIL's 8-bit output would (rounded, clipped).
    Only pixels inside `within` (top, left, height, width; default: the box itself, since
    torchvision crops before it resizes) are read, so a canvas's zero padding never leaks in.
    Resize-then-centre-crop (the eval transform) is one fractional box with `within` = the
    valid image (see `resize_center_crop_box`). `flip` mirrors the output horizontally at no
    cost by reversing the column weights. `box` may be fractional.

    `window` (static (height, width)): resample only a window of the image that size, cut where
    the pixels with a nonzero weight start, instead of the whole image. The caller guarantees
    that these pixels span at most `window` (`max_crop_box` for RandomResizedCrop boxes read
    with the default `within`; `support_span` where `within` is wider than the box). The
    pixels left out have zero weights and the kept weights are the same floats, so only the
    order of the float32 sums of the two passes changes: a value whose exact result is an
    8-bit rounding tie (x.5) may then round to the neighbouring level (see `_cut_window`).
    """
    box = jnp.asarray(box, jnp.float32)
    within = box if within is None else jnp.asarray(within, jnp.float32)
    in_h, in_w = image.shape[0], image.shape[1]
    rows = axis_weights(box[0], box[2], within[0], within[0] + within[2], in_h, out_hw[0])
    cols = axis_weights(box[1], box[3], within[1], within[1] + within[3], in_w, out_hw[1])
    cols = jnp.where(flip, cols[::-1], cols)
    if window is not None:
        image, rows, cols = _cut_window(image, rows, cols, window)
    image = image.astype(jnp.float32)
    # Horizontal pass first, rounded into 8 bits as PIL stores it in a temporary image; then
    # the vertical pass, rounded likewise.
    tmp = jnp.einsum("ox,yxc->yoc", cols, image, precision=precision)  # (in_h, out_w, C)
    tmp = jnp.floor(jnp.clip(tmp, 0.0, 255.0) + 0.5)
    out = jnp.einsum("py,yoc->poc", rows, tmp, precision=precision)  # (out_h, out_w, C)
    return jnp.floor(jnp.clip(out, 0.0, 255.0) + 0.5)


def _cut_window(
    image: jax.Array, rows: jax.Array, cols: jax.Array, window: tuple[int, int]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The (win_h, win_w, C) window of an (H, W, C) image and the matching columns of the
    (out_h, H) row and (out_w, W) column weights.

    The weights are those of the whole image, cut (not recomputed), so each kept weight is
    bit-identical and their normalisation unchanged. Each axis's window starts at its first
    pixel with a nonzero weight, moved back to fit inside the image where that pixel is
    near the far border (`dynamic_slice` would clamp alike; the clamp is explicit so the
    image and its weights are cut at the same place). A window as large as the image is
    not cut.
    """
    starts, sizes = [], []
    for weights, size in ((rows, window[0]), (cols, window[1])):
        extent = weights.shape[1]
        size = min(int(size), extent)
        first = jnp.argmax(jnp.any(weights != 0.0, axis=0)).astype(jnp.int32)
        starts.append(jnp.clip(first, 0, extent - size))
        sizes.append(size)
    (top, left), (win_h, win_w) = starts, sizes
    if (win_h, win_w) == image.shape[:2]:
        return image, rows, cols
    image = jax.lax.dynamic_slice(image, (top, left, 0), (win_h, win_w, image.shape[2]))
    rows = jax.lax.dynamic_slice_in_dim(rows, top, win_h, axis=1)
    cols = jax.lax.dynamic_slice_in_dim(cols, left, win_w, axis=1)
    return image, rows, cols


@functools.lru_cache(maxsize=64)
def max_crop_box(
    in_hw: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int]:
    """The largest (height, width) `crop_box_from_uniforms` can return for any image that
    fits `in_hw`: the static window of a RandomResizedCrop read from an `in_hw` canvas.

    The box is what is read: torchvision crops before it resizes, so no filter support is
    added. Bounded over every valid (H, W) <= in_hw: an accepted draw's side is at most the
    rounded side of the largest area at the extreme aspect (and the image's side); where some
    draw can fail (too tall, too wide or empty, so that all `RRC_TRIES` may), the central
    fallback box counts too. Each float comparison is taken with `_BOUND_SLACK` the
    conservative way. Global crops with scale up to 1 give the whole canvas.
    """
    up, down = 1.0 + _BOUND_SLACK, 1.0 - _BOUND_SLACK
    s_lo, s_hi = scale
    r_lo, r_hi = min(ratio), max(ratio)
    h = np.arange(1, in_hw[0] + 1, dtype=np.float64)[:, None]
    w = np.arange(1, in_hw[1] + 1, dtype=np.float64)[None, :]

    def most(x):  # the largest value round(x) can take, x known to within the slack
        return np.floor(x * up + 0.5)

    def may_be_empty(x):  # round(x) may be 0 (half to even: round(0.5) = 0)
        return x * down <= 0.5

    area = h * w
    tallest = most(np.sqrt(area * s_hi / r_lo))
    widest = most(np.sqrt(area * s_hi * r_hi))
    empty = may_be_empty(np.sqrt(area * s_lo / r_hi)) | may_be_empty(np.sqrt(area * s_lo * r_lo))
    may_fall_back = (tallest > h) | (widest > w) | empty
    # The fallback: the whole image, its height cut to round(W / r_lo) when it is too tall
    # (never above H), its width to round(H * r_hi) when too wide.
    fallback_h = np.where(w / h < r_lo * down, np.minimum(h, most(w / r_lo)), h)
    fallback_w = np.where(w / h > r_hi * up, np.minimum(w, most(h * r_hi)), w)
    box_h = np.maximum(np.minimum(h, tallest), np.where(may_fall_back, fallback_h, 0.0))
    box_w = np.maximum(np.minimum(w, widest), np.where(may_fall_back, fallback_w, 0.0))
    return int(box_h.max()), int(box_w.max())


def support_span(length: float, out_size: int) -> int:
    """Most source pixels with a nonzero weight along an axis where a box side of `length`
    (or less) is resized to `out_size` and `within` does not cut it: the box plus PIL's
    bicubic support, 2 * max(scale, 1) pixels on each side (the kernel widens when
    shrinking), plus one for where the span's ends fall between pixels.
    """
    scale = length / out_size
    return math.ceil(length - scale + 2 * _PIL_CUBIC_SUPPORT * max(scale, 1.0)) + 1


def resize_center_crop_box(size_hw: jax.Array, resize: int, crop: int) -> jax.Array:
    """Source-pixel box of torchvision `Resize(resize)` (shorter side) + `CenterCrop(crop)`.

    Returns float32 (top, left, height, width); pass it to `resized_crop` with `within` =
    (0, 0, height, width) of the image. Assumes the crop fits in the resized image.
    """
    height = size_hw[0].astype(jnp.int32)
    width = size_hw[1].astype(jnp.int32)
    short, long = jnp.minimum(height, width), jnp.maximum(height, width)
    # torchvision truncates the longer side: int(resize * long / short).
    new_long = (resize * long) // short
    new_h = jnp.where(height <= width, resize, new_long)
    new_w = jnp.where(height <= width, new_long, resize)
    # CenterCrop offsets: int(round((size - crop) / 2)), half to even as Python rounds.
    top = jnp.round((new_h - crop) / 2.0)
    left = jnp.round((new_w - crop) / 2.0)
    scale_h = height.astype(jnp.float32) / new_h.astype(jnp.float32)
    scale_w = width.astype(jnp.float32) / new_w.astype(jnp.float32)
    return jnp.stack([top * scale_h, left * scale_w, crop * scale_h, crop * scale_w])
