"""Position-embedding interpolation identical to the official (PyTorch bicubic) resize."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

# PyTorch's cubic convolution constant; jax.image.resize uses -0.5 (Keys), which does not match.
_TORCH_CUBIC_A = -0.75


def _cubic_weight(x: np.ndarray) -> np.ndarray:
    a = _TORCH_CUBIC_A
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """(out_size, in_size) weights of torch's bicubic upsampling along one axis.

    torch maps output index o to source o' = (o + 0.5) / scale - 0.5 when `scale_factor` is
    given (align_corners=False), takes the four taps floor(o') - 1 .. floor(o') + 2 clamped to
    the border, and does not antialias.
    """
    src = (np.arange(out_size, dtype=np.float64) + 0.5) / scale - 0.5
    base = np.floor(src)
    frac = src - base
    mat = np.zeros((out_size, in_size), np.float64)
    for tap in range(-1, 3):
        idx = np.clip(base + tap, 0, in_size - 1).astype(np.int64)
        np.add.at(mat, (np.arange(out_size), idx), _cubic_weight(tap - frac))
    return mat


def grid_size(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"pos_embed has {num_patches} patch positions: not a square grid")
    return side


def interpolate_pos_embed(pos_embed: jnp.ndarray, rows: int, cols: int) -> jnp.ndarray:
    """Resize a (1, 1 + g*g, D) position embedding to a rows x cols patch grid.

    Follows the official `interpolate_pos_encoding`: unchanged when the grid already matches
    (square input with the training number of patches); otherwise bicubic with
    scale_factor = (n + 0.1) / g per axis, the CLS position kept as is.
    """
    g = grid_size(pos_embed.shape[1] - 1)
    if rows == cols == g:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    # The +0.1 offset is the official fix for floating-point error in the output size.
    r = bicubic_matrix(g, rows, (rows + 0.1) / g)
    c = bicubic_matrix(g, cols, (cols + 0.1) / g)
    grid = patch_pos.reshape(g, g, -1).astype(jnp.float32)  # row-major patch grid
    resized = jnp.einsum(
        "rg,ghd,ch->rcd",
        jnp.asarray(r, jnp.float32),
        grid,
        jnp.asarray(c, jnp.float32),
        precision="highest",
    )
    patch_pos = resized.reshape(1, rows * cols, -1).astype(pos_embed.dtype)
    return jnp.concatenate([cls_pos, patch_pos], axis=1)
