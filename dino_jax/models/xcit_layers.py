"""The layers of XCiT (facebookresearch/xcit's xcit.py) as Flax linen modules.

Names follow the official state dict (`patch_embed/proj_0_0` for `patch_embed.proj.0.0`,
`blocks_0/local_mp/conv1`), so official weights map onto these params mechanically.
Tokens are (B, N, D) row-major over the patch grid; images and conv maps are NHWC.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dino_jax.models.batchnorm import BatchNorm
from dino_jax.models.vit import Mlp, _Layers, gelu_fn, torch_default_uniform

FOURIER_DIM = 32  # xcit.py PositionalEncodingFourier(hidden_dim=32): 32 features per axis
FOURIER_TEMPERATURE = 10000.0


def fourier_features(rows: int, cols: int) -> jax.Array:
    """The (rows, cols, 64) sin/cos features of xcit.py's PositionalEncodingFourier, float32.

    Each axis position is `(i + 1) / (n + 1e-6) * 2pi` (the official cumsum of ones over the
    last value plus eps); its 32 features alternate sin (even k) and cos (odd k) of
    `v / 10000 ** (2 * (k // 2) / 32)`; the y features come first. Always float32, as the
    official code builds them with an explicit float32 dtype.
    """
    k = jnp.arange(FOURIER_DIM, dtype=jnp.float32)
    dim_t = jnp.power(jnp.float32(FOURIER_TEMPERATURE), 2 * (k // 2) / FOURIER_DIM)
    even = (jnp.arange(FOURIER_DIM) % 2 == 0)[None, :]

    def axis(n: int) -> jax.Array:  # (n, 32)
        v = jnp.arange(1, n + 1, dtype=jnp.float32) / jnp.float32(n + 1e-6)
        v = (v * jnp.float32(2 * math.pi))[:, None] / dim_t
        return jnp.where(even, jnp.sin(v), jnp.cos(v))

    pos_y = jnp.broadcast_to(axis(rows)[:, None], (rows, cols, FOURIER_DIM))
    pos_x = jnp.broadcast_to(axis(cols)[None, :], (rows, cols, FOURIER_DIM))
    return jnp.concatenate([pos_y, pos_x], axis=-1)


def cross_covariance_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, temperature: jax.Array
) -> jax.Array:
    """XCA on (B, N, h, hd) q, k, v: attention between channels, not tokens (xcit.py's XCA).

    q and k are L2-normalised along the token axis (F.normalize: `x / max(||x||, 1e-12)`);
    the (hd, hd) logits per head are scaled by the learned `temperature` (h, 1, 1) instead
    of `hd ** -0.5`; each output channel is a softmax-weighted sum of the value channels.
    """

    def normalize(t: jax.Array) -> jax.Array:
        t32 = t.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(t32), axis=1, keepdims=True))
        return (t32 / jnp.maximum(norm, 1e-12)).astype(t.dtype)

    logits = jnp.einsum("bnhc,bnhd->bhcd", normalize(q), normalize(k))
    logits = logits.astype(jnp.float32) * temperature.astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhcd,bnhd->bnhc", weights, v)


class _XCiTLayers(_Layers):
    """`_Layers` plus the BatchNorm, stochastic depth and GELU every XCiT module shares."""

    gelu: str = "exact"  # a vit.GELUS name, for every GELU of the model (official: exact)

    def batch_norm(self, name: str) -> BatchNorm:
        return BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def drop_path(self, branch: jax.Array, rate: float, train: bool) -> jax.Array:
        """Stochastic depth per sample (rng "drop_path"), as vit.Block._drop_path."""
        if not train or rate == 0.0:
            return branch
        keep_prob = 1.0 - rate
        shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)
        keep = jax.random.bernoulli(self.make_rng("drop_path"), keep_prob, shape)
        return jnp.where(keep, branch / keep_prob, jnp.zeros_like(branch))


class ConvPatchEmbed(_XCiTLayers):
    """xcit.py's ConvPatchEmbed: 3x3 stride-2 convs (no bias) + BatchNorm, GELU between.

    Patch 16 has 4 stages (D/8, D/4, D/2, D), patch 8 has 3 (D/4, D/2, D). Each stage maps
    n pixels to floor((n - 1) / 2) + 1, so any input size works. Returns (B, Hp, Wp, D).
    """

    patch_size: int = 16
    embed_dim: int = 384

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool = True) -> jax.Array:
        stages = {16: 4, 8: 3}.get(self.patch_size)
        if stages is None:
            raise ValueError(f"XCiT patch_size must be 8 or 16, got {self.patch_size}")
        widths = [self.embed_dim // 2 ** (stages - 1 - i) for i in range(stages)]
        for i, width in enumerate(widths):
            if i:
                x = gelu_fn(self.gelu)(x)
            fan_in = x.shape[-1] * 9
            x = nn.Conv(
                width,
                (3, 3),
                strides=(2, 2),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=torch_default_uniform(fan_in),  # official: PyTorch's default
                name=f"proj_{2 * i}_0",  # Sequential index 2i (odd ones are the GELUs)
            )(x)
            x = self.batch_norm(f"proj_{2 * i}_1")(x, use_running_average)
        return x


class PositionalEncodingFourier(_XCiTLayers):
    """Fourier features of the patch grid, projected by a 1x1 conv: (1, rows * cols, D).

    Kept in float32 (features and projection) whatever the model dtype; it does not depend
    on the image, so it is computed once per grid and broadcast over the batch.
    """

    embed_dim: int = 384

    @nn.compact
    def __call__(self, rows: int, cols: int) -> jax.Array:
        fan_in = 2 * FOURIER_DIM
        proj = nn.Conv(
            self.embed_dim,
            (1, 1),
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_uniform(fan_in),
            bias_init=torch_default_uniform(fan_in),
            name="token_projection",
        )
        pos = proj(fourier_features(rows, cols)[None])
        return pos.reshape(1, rows * cols, self.embed_dim)


class XCA(_XCiTLayers):
    num_heads: int = 8
    qkv_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        temperature = self.param(
            "temperature", nn.initializers.ones, (self.num_heads, 1, 1), self.param_dtype
        )
        qkv = self.dense(3 * dim, "qkv", use_bias=self.qkv_bias)(x)
        # Features ordered (q|k|v, head, head_dim), as the official reshape.
        q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 2, 0)
        out = cross_covariance_attention(q, k, v, temperature)
        return self.dense(dim, "proj")(out.reshape(batch, tokens, dim))


class LPI(_XCiTLayers):
    """Local patch interaction: depthwise 3x3 conv -> GELU -> BatchNorm -> depthwise 3x3."""

    @nn.compact
    def __call__(self, x: jax.Array, rows: int, cols: int, use_running_average: bool):
        batch, tokens, dim = x.shape

        def depthwise(name: str) -> nn.Conv:
            # kernel (3, 3, 1, C): HWIO of the official grouped conv's [C, 1, 3, 3]
            return nn.Conv(
                dim,
                (3, 3),
                padding=((1, 1), (1, 1)),
                feature_group_count=dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=torch_default_uniform(9),
                bias_init=torch_default_uniform(9),
                name=name,
            )

        y = depthwise("conv1")(x.reshape(batch, rows, cols, dim))
        y = self.batch_norm("bn")(gelu_fn(self.gelu)(y), use_running_average)
        return depthwise("conv2")(y).reshape(batch, tokens, dim)


class XCABlock(_XCiTLayers):
    """`x += g1 * XCA(norm1 x); x += g3 * LPI(norm3 x); x += g2 * MLP(norm2 x)` (note the names)."""

    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    eta: float = 1.0
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, rows: int, cols: int, train: bool, use_running_average: bool):
        dim = x.shape[-1]
        layers = {"dtype": self.dtype, "param_dtype": self.param_dtype, "gelu": self.gelu}
        gamma = {
            n: self.param(n, nn.initializers.constant(self.eta), (dim,), self.param_dtype)
            for n in ("gamma1", "gamma2", "gamma3")
        }

        def residual(x, name, branch):
            y = gamma[name].astype(self.dtype) * branch
            return x + self.drop_path(y, self.drop_path_rate, train)

        attn = XCA(num_heads=self.num_heads, qkv_bias=self.qkv_bias, name="attn", **layers)
        x = residual(x, "gamma1", attn(self.norm("norm1")(x)))
        lpi = LPI(name="local_mp", **layers)
        x = residual(x, "gamma3", lpi(self.norm("norm3")(x), rows, cols, use_running_average))
        mlp = Mlp(hidden_dim=int(dim * self.mlp_ratio), name="mlp", **layers)
        return residual(x, "gamma2", mlp(self.norm("norm2")(x)))


class ClassAttention(_XCiTLayers):
    """CaiT class attention: only the CLS token (token 0) queries all tokens. -> (B, 1, D)."""

    num_heads: int = 8
    qkv_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = self.dense(3 * dim, "qkv", use_bias=self.qkv_bias)(x)
        q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 2, 0)
        logits = jnp.einsum("bhd,bnhd->bhn", q[:, 0], k) * head_dim**-0.5
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        cls = jnp.einsum("bhn,bnhd->bhd", weights, v).reshape(batch, 1, dim)
        return self.dense(dim, "proj")(cls)


class ClassAttentionBlock(_XCiTLayers):
    """xcit.py's ClassAttentionBlock with its residual quirks kept (they change the CLS output).

    Its attention returns `cat([cls, norm1(x)[:, 1:]])`, so the first residual also adds
    `gamma1 * norm1(x)` to every patch token; the second adds `cat([gamma2 * mlp(cls),
    patches])`, i.e. doubles the patch tokens. The official model gives these blocks no
    stochastic depth (XCiT never passes its drop_path to them).
    """

    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    eta: float = 1.0
    tokens_norm: bool = True  # norm2 on all tokens (True) or on the CLS token only

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        layers = {"dtype": self.dtype, "param_dtype": self.param_dtype, "gelu": self.gelu}
        gamma1, gamma2 = (
            self.param(n, nn.initializers.constant(self.eta), (dim,), self.param_dtype)
            for n in ("gamma1", "gamma2")
        )
        u = self.norm("norm1")(x)
        attn = ClassAttention(
            num_heads=self.num_heads, qkv_bias=self.qkv_bias, name="attn", **layers
        )
        cls = attn(u)
        x = x + gamma1.astype(self.dtype) * jnp.concatenate([cls, u[:, 1:]], axis=1)
        norm2 = self.norm("norm2")
        x = norm2(x) if self.tokens_norm else x.at[:, :1].set(norm2(x[:, :1]))
        mlp = Mlp(hidden_dim=int(dim * self.mlp_ratio), name="mlp", **layers)
        cls = gamma2.astype(self.dtype) * mlp(x[:, :1])
        return x + jnp.concatenate([cls, x[:, 1:]], axis=1)
