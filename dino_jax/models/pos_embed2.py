"""DINOv2's position-embedding resize: `interpolate_offset` and PyTorch's antialiased bicubic.

dinov2/models/vision_transformer.py's `interpolate_pos_encoding` calls F.interpolate(bicubic)
either with scale_factor = (n + offset) / M (offset != 0) or with the output size (offset 0),
and with `antialias=interpolate_antialias`. Without antialiasing this is DINO v1's resize
(dino_jax.models.pos_embed, cubic A = -0.75, four clamped taps). With it PyTorch runs its
separable antialiased kernel, even when upsampling: Keys' cubic with A = -0.5, stretched by the
input/output ratio when downsampling, taps outside the grid dropped, weights renormalised.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from dino_jax.models.pos_embed import bicubic_matrix, grid_size

_AA_CUBIC_A = -0.5  # PyTorch's antialiased bicubic filter (Keys); the plain one uses -0.75
_CUBIC_SUPPORT = 2.0  # half the 4-tap width of the cubic kernel


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    a = _AA_CUBIC_A
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def antialiased_bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """(out_size, in_size) weights of torch's `interpolate(bicubic, antialias=True)` on one axis.

    `scale` is input/output (1 / scale_factor, or in_size / out_size when a size is given).
    Output i is centred at c = scale * (i + 0.5) in input coordinates; the kernel spans
    `support` = 2 * max(scale, 1) input pixels either side and is widened by the same factor
    (a low-pass filter when downsampling); taps j in [int(c - support + .5), int(c + support
    + .5)) inside the grid, weights k((j - c + .5) / max(scale, 1)) normalised to sum 1, as
    aten's _compute_indices_min_size_weights_aa.
    """
    support = _CUBIC_SUPPORT * scale if scale >= 1.0 else _CUBIC_SUPPORT
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    mat = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi, dtype=np.float64)
        weights = _keys_cubic((taps - center + 0.5) * invscale)
        total = weights.sum()
        mat[i, lo:hi] = weights / total if total != 0 else weights
    return mat


def _axis_matrix(grid: int, out: int, offset: float, antialias: bool) -> np.ndarray:
    """One axis's resize matrix and the check that torch's output size is `out`."""
    if offset:
        scale_factor = (out + offset) / grid
        # F.interpolate's output size floor(in * scale_factor), in double precision
        if math.floor(grid * scale_factor) != out:
            raise ValueError(
                f"interpolate_offset={offset} resizes a grid of {grid} to "
                f"{math.floor(grid * scale_factor)} positions, not {out}"
            )
    else:  # a size: aten's scale is then out / in, the kernels use in / out
        scale_factor = out / grid
    if antialias and out == grid:
        # aten's CPU antialiased kernel skips an axis whose size is unchanged, whatever the
        # scale factor; the plain bicubic one resamples it (a shift when offset != 0).
        return np.eye(grid)
    if antialias:
        return antialiased_bicubic_matrix(grid, out, 1.0 / scale_factor)
    return bicubic_matrix(grid, out, scale_factor)


def interpolate_pos_embed2(
    pos_embed: jnp.ndarray,
    rows: int,
    cols: int,
    *,
    offset: float = 0.1,
    antialias: bool = False,
) -> jnp.ndarray:
    """Resize a (1, 1 + M*M, D) position embedding to a rows x cols patch grid, as DINOv2.

    Unchanged for a square input with the stored number of patches; otherwise the patch part
    is resized in float32 (the official code casts pos_embed to float) with scale_factor
    (n + offset) / M per axis, or the exact size when `offset` is 0; the CLS position is kept.
    Registers have no position embedding. Returns float32 when resized, as the official.
    """
    g = grid_size(pos_embed.shape[1] - 1)
    if rows == cols == g:
        return pos_embed
    cls_pos = pos_embed[:, :1].astype(jnp.float32)
    r = _axis_matrix(g, rows, offset, antialias)
    c = _axis_matrix(g, cols, offset, antialias)
    grid = pos_embed[:, 1:].reshape(g, g, -1).astype(jnp.float32)  # row-major patch grid
    resized = jnp.einsum(
        "rg,ghd,ch->rcd",
        jnp.asarray(r, jnp.float32),
        grid,
        jnp.asarray(c, jnp.float32),
        precision="highest",
    )
    return jnp.concatenate([cls_pos, resized.reshape(1, rows * cols, -1)], axis=1)
