"""Axial 2-D rotary position embedding (RoPE) of DINOv3, as pure functions.

Follows dinov3/layers/rope_position_encoding.py's RopePositionEmbedding (periods, patch-centre
coordinates in [-1, 1], the training-only shift / jitter / rescale of those coordinates) and
dinov3/layers/attention.py's rope_apply / SelfAttention.apply_rope (half-split rotation of q
and k, the prefix tokens left alone). Nothing here is learned and nothing depends on a stored
grid: any patch grid gets its own sin / cos, so a RoPE ViT takes any input size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NORMALIZE_COORDS = ("separate", "max", "min")

# (exponent bits, mantissa bits) of the low-precision formats the official module may run in.
_FORMATS = {jnp.dtype(jnp.bfloat16): (8, 7), jnp.dtype(jnp.float16): (5, 10)}


def _rounding(dtype):
    """Rounds a float32 value to `dtype` after each operation, as PyTorch's CPU kernels do for
    bfloat16 / float16 tensors (each op computes in float32 and rounds its result).

    `lax.reduce_precision` is kept by XLA, where a round trip through bfloat16 arrays may be
    fused away (excess precision), so sin / cos match the official ones computed in bfloat16.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return lambda x: x
    if dtype not in _FORMATS:
        raise ValueError(f"RoPE dtype {dtype} is not float32, bfloat16 or float16")
    exponent_bits, mantissa_bits = _FORMATS[dtype]
    return lambda x: jax.lax.reduce_precision(x, exponent_bits, mantissa_bits)


def rope_periods(
    head_dim: int,
    *,
    base: float | None = 100.0,
    min_period: float | None = None,
    max_period: float | None = None,
    dtype=jnp.float32,
) -> jax.Array:
    """(head_dim // 4,) periods: `base ** (2i / (head_dim / 2))`, or log-spaced from
    `min_period` to `max_period` (exactly one of the two parametrisations)."""
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head dimension divisible by 4, got {head_dim}")
    both_periods = min_period is not None and max_period is not None
    if (base is None) == (not both_periods):
        raise ValueError("give either `base` or both `min_period` and `max_period`")
    r = _rounding(dtype)
    n = head_dim // 4
    if base is not None:
        exponents = r(r(2 * jnp.arange(n, dtype=jnp.float32)) / (head_dim // 2))
        periods = r(jnp.float32(base) ** exponents)
    else:
        ratio = max_period / min_period
        exponents = r(jnp.linspace(0.0, 1.0, n, dtype=jnp.float32))
        periods = r(jnp.float32(ratio) ** exponents)  # 1 .. max / min
        periods = r(periods / jnp.float32(ratio))  # min / max .. 1
        periods = r(periods * jnp.float32(max_period))  # min .. max
    return periods.astype(dtype)


def rope_coords(h: int, w: int, normalize_coords: str = "separate", dtype=jnp.float32) -> jax.Array:
    """(h * w, 2) patch-centre coordinates (row, column), row-major over the grid, in [-1, 1].

    "separate" divides rows by h and columns by w (both span [-1, 1]); "max" / "min" divide
    both by max(h, w) / min(h, w), keeping the aspect ratio. Returned as float32 holding
    values of `dtype`.
    """
    if normalize_coords not in NORMALIZE_COORDS:
        raise ValueError(f"normalize_coords={normalize_coords!r}, not one of {NORMALIZE_COORDS}")
    r = _rounding(dtype)
    denominators = {"separate": (h, w), "max": (max(h, w),) * 2, "min": (min(h, w),) * 2}
    dh, dw = denominators[normalize_coords]
    coords_h = r(r(jnp.arange(h, dtype=jnp.float32) + 0.5) / dh)
    coords_w = r(r(jnp.arange(w, dtype=jnp.float32) + 0.5) / dw)
    grid = jnp.stack(jnp.meshgrid(coords_h, coords_w, indexing="ij"), axis=-1)  # (h, w, 2)
    return r(r(2.0 * grid.reshape(h * w, 2)) - 1.0)


def augment_coords(
    coords: jax.Array,
    key: jax.Array,
    *,
    shift: float | None = None,
    jitter: float | None = None,
    rescale: float | None = None,
    dtype=jnp.float32,
) -> jax.Array:
    """The official training-time coordinate augmentations, one draw for the whole batch:
    add U(-shift, shift) per axis, multiply per axis by a log-uniform factor in
    [1/jitter, jitter], then multiply both axes by one log-uniform factor in
    [1/rescale, rescale]. Each is skipped when None (the official defaults)."""
    r = _rounding(dtype)
    k_shift, k_jitter, k_rescale = jax.random.split(key, 3)
    if shift is not None:
        delta = r(jax.random.uniform(k_shift, (2,), jnp.float32, -shift, shift))
        coords = r(coords + delta[None, :])
    if jitter is not None:
        log_j = math.log(jitter)
        factor = r(jnp.exp(r(jax.random.uniform(k_jitter, (2,), jnp.float32, -log_j, log_j))))
        coords = r(coords * factor[None, :])
    if rescale is not None:
        log_s = math.log(rescale)
        factor = r(jnp.exp(r(jax.random.uniform(k_rescale, (1,), jnp.float32, -log_s, log_s))))
        coords = r(coords * factor)
    return coords


def rope_sin_cos(
    coords: jax.Array, periods: jax.Array, dtype=jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """(sin, cos), each (n_tokens, head_dim), of the angles 2 pi coord / period.

    The last axis holds every row angle, then every column angle (head_dim / 2 in all), and
    that half repeated: the layout `rope_apply`'s half-split rotation pairs up.
    """
    r = _rounding(dtype)
    n_tokens = coords.shape[0]
    periods = periods.astype(jnp.float32)
    angles = r(r(jnp.float32(2 * math.pi) * coords[:, :, None]) / periods[None, None, :])
    angles = jnp.tile(angles.reshape(n_tokens, -1), (1, 2))  # (n_tokens, head_dim)
    return r(jnp.sin(angles)).astype(dtype), r(jnp.cos(angles)).astype(dtype)


def rope_embedding(
    h: int,
    w: int,
    *,
    head_dim: int,
    base: float | None = 100.0,
    min_period: float | None = None,
    max_period: float | None = None,
    normalize_coords: str = "separate",
    shift_coords: float | None = None,
    jitter_coords: float | None = None,
    rescale_coords: float | None = None,
    dtype=jnp.float32,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) for an h x w patch grid: RopePositionEmbedding(H=h, W=w).

    `key=None` is the official eval mode (no augmentation); with a key, the configured
    shift / jitter / rescale are drawn as in training mode. All arithmetic in `dtype`
    (the official `pos_embed_rope_dtype`).
    """
    periods = rope_periods(
        head_dim, base=base, min_period=min_period, max_period=max_period, dtype=dtype
    )
    coords = rope_coords(h, w, normalize_coords, dtype)
    if key is not None:
        coords = augment_coords(
            coords,
            key,
            shift=shift_coords,
            jitter=jitter_coords,
            rescale=rescale_coords,
            dtype=dtype,
        )
    return rope_sin_cos(coords, periods, dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] on the last axis split in halves (not interleaved pairs)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rope_apply(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin: rotates feature i with feature i + head_dim / 2."""
    return x * cos + rotate_half(x) * sin


def apply_rope(
    q: jax.Array, k: jax.Array, sin: jax.Array, cos: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Rotate the last `sin.shape[0]` tokens of q and k, (B, N, heads, head_dim) each.

    The first N - HW tokens (CLS and storage tokens) carry no position and pass unchanged.
    The rotation runs in the RoPE dtype and the result is cast back, as the official
    apply_rope does (a bfloat16 RoPE therefore rounds float32 q and k to bfloat16).
    """
    prefix = q.shape[1] - sin.shape[0]
    if prefix < 0:
        raise ValueError(f"{sin.shape[0]} RoPE positions for only {q.shape[1]} tokens")
    sin, cos = sin[:, None, :], cos[:, None, :]  # broadcast over heads

    def rotate(t):
        u = t.astype(sin.dtype)  # the prefix is cast too, as the official code does
        rotated = rope_apply(u[:, prefix:], sin, cos)
        return jnp.concatenate([u[:, :prefix], rotated], axis=1).astype(t.dtype)

    return rotate(q), rotate(k)
