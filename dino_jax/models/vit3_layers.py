"""The layers of DINOv3's ViT (dinov3/layers/) as Flax linen modules, used by vit3.py.

The qkv projection with its optionally masked k bias, RoPE self-attention, the SwiGLU
feed-forward and the SelfAttentionBlock that combines them with LayerScale and the official
subset stochastic depth. Parameter names follow the official state dict (`attn/qkv` for
`attn.qkv`, `mlp/w1`, `ls1/gamma`), so official weights map onto these params mechanically.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.models import rope
from dino_jax.models.vit import Mlp, _Layers, fused_attention, trunc_normal_02
from dino_jax.models.vit2 import LayerScale, add_residual_subset

Dtype = Any

# The official ffn_layer names: SwiGLU hidden widths are rounded up to these multiples.
SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}


def swiglu_hidden(hidden: int, align: int) -> int:
    """SwiGLUFFN's width: 2/3 of the MLP width, rounded up to a multiple of `align`."""
    d = int(hidden * 2 / 3)
    return d + (-d % align)


class _Layers3(_Layers):
    norm_eps: float = 1e-5

    def norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(
            epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )


class QKV(nn.Module):
    """The qkv projection; with `mask_k_bias` the k third of the bias is stored but multiplied
    by 0, as LinearKMaskedBias with its bias_mask [1]*D + [0]*D + [1]*D does."""

    features: int
    use_bias: bool = True
    mask_k_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", trunc_normal_02, (x.shape[-1], self.features), self.param_dtype
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.mask_k_bias:
                bias = bias * k_bias_mask(self.features).astype(bias.dtype)
            y = y + bias.astype(self.dtype)
        return y


def k_bias_mask(features: int) -> np.ndarray:
    """The official bias_mask buffer after init_weights_vit: 1 on q and v, 0 on k."""
    d = features // 3
    return np.concatenate([np.ones(d), np.zeros(d), np.ones(features - 2 * d)]).astype(np.float32)


class SwiGLUFFN(_Layers):
    """w3(silu(w1 x) * w2 x) with separate w1, w2 (dinov3/layers/ffn_layers.py)."""

    hidden_dim: int = 1024
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x1 = self.dense(self.hidden_dim, "w1", self.use_bias)(x)
        x2 = self.dense(self.hidden_dim, "w2", self.use_bias)(x)
        return self.dense(x.shape[-1], "w3", self.use_bias)(nn.silu(x1) * x2)


class RopeAttention(_Layers):
    """SelfAttention of dinov3/layers/attention.py: RoPE on the patch tokens of q and k."""

    num_heads: int = 6
    qkv_bias: bool = True
    proj_bias: bool = True
    mask_k_bias: bool = False
    implementation: str | None = None
    pad_to: int = 0  # vit.fused_attention's token padding (0: none)

    @nn.compact
    def __call__(self, x: jax.Array, sin_cos: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = QKV(
            3 * dim,
            use_bias=self.qkv_bias,
            mask_k_bias=self.mask_k_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="qkv",
        )(x)
        # Features ordered (q|k|v, head, head_dim), as the official reshape.
        q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 2, 0)
        if sin_cos is not None:
            q, k = rope.apply_rope(q, k, *sin_cos)
        out = fused_attention(q, k, v, self.implementation, self.pad_to)
        return self.dense(dim, "proj", self.proj_bias)(out.reshape(batch, tokens, dim))


class Block(_Layers3):
    """SelfAttentionBlock: x + ls1(attn(norm1 x)), then + ls2(ffn(norm2 x)).

    Stochastic depth as the official one (block.py's _forward_list): in training each branch
    runs on a random subset of max(int(b * (1 - drop_path)), 1) samples and is added to them
    scaled by b / that number, a fresh subset per branch (vit2.add_residual_subset).
    """

    num_heads: int = 6
    ffn_ratio: float = 4.0
    ffn_layer: str = "mlp"
    qkv_bias: bool = False
    proj_bias: bool = True
    ffn_bias: bool = True
    mask_k_bias: bool = False
    layerscale_init: float | None = None
    drop_path: float = 0.0
    attention_impl: str | None = None
    attention_pad: int = 0
    gelu: str = "exact"

    def _residual(self, x, branch_fn, train: bool, name: str):
        def branch(y):
            out = branch_fn(y)
            if self.layerscale_init is None:
                return out
            return LayerScale(self.layerscale_init, self.param_dtype, name=name)(out)

        if not train or self.drop_path == 0.0:
            return x + branch(x)
        return add_residual_subset(x, branch, self.drop_path, self.make_rng("drop_path"))

    @nn.compact
    def __call__(self, x, sin_cos=None, train: bool = False):
        layers = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        attn = RopeAttention(
            num_heads=self.num_heads,
            qkv_bias=self.qkv_bias,
            proj_bias=self.proj_bias,
            mask_k_bias=self.mask_k_bias,
            implementation=self.attention_impl,
            pad_to=self.attention_pad,
            name="attn",
            **layers,
        )
        norm1, norm2 = self.norm("norm1"), self.norm("norm2")
        x = self._residual(x, lambda y: attn(norm1(y), sin_cos), train, "ls1")
        hidden = int(x.shape[-1] * self.ffn_ratio)
        if self.ffn_layer == "mlp":
            ffn = Mlp(hidden_dim=hidden, gelu=self.gelu, name="mlp", **layers)
        else:
            width = swiglu_hidden(hidden, SWIGLU_ALIGN[self.ffn_layer])
            ffn = SwiGLUFFN(hidden_dim=width, use_bias=self.ffn_bias, name="mlp", **layers)
        return self._residual(x, lambda y: ffn(norm2(y)), train, "ls2")
