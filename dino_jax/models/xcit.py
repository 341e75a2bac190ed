"""XCiT backbone (El-Nouby et al. 2021; facebookresearch/xcit's xcit.py), as DINO trains it.

DINO's hubconf and main_dino.py build these models from the XCiT repository with
`num_classes=0`; the DINO feature is the final-norm CLS token. Param names follow the
official state dict, so released DINO XCiT weights load mechanically.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from dino_jax.models.vit import LN_EPS, trunc_normal_02
from dino_jax.models.xcit_layers import (
    ClassAttentionBlock,
    ConvPatchEmbed,
    PositionalEncodingFourier,
    XCABlock,
)

Dtype = Any

# xcit.py's registered constructors: (embed_dim, depth, num_heads, eta, tokens_norm), each
# with patch 16 and patch 8; mlp_ratio 4, qkv_bias, LayerNorm eps 1e-6 throughout. DINO
# released xcit_small_12_p16/p8 and xcit_medium_24_p16/p8.
_SIZES = {
    "nano_12": (128, 12, 4, 1.0, False),
    "tiny_12": (192, 12, 4, 1.0, True),
    "small_12": (384, 12, 8, 1.0, True),
    "tiny_24": (192, 24, 4, 1e-5, True),
    "small_24": (384, 24, 8, 1e-5, True),
    "medium_24": (512, 24, 8, 1e-5, True),
    "large_24": (768, 24, 16, 1e-5, True),
}
XCIT_ARCHS: dict[str, dict[str, Any]] = {
    f"xcit_{size}_p{p}": {
        "patch_size": p,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
        "eta": eta,
        "tokens_norm": tokens_norm,
    }
    for size, (dim, depth, heads, eta, tokens_norm) in _SIZES.items()
    for p in (16, 8)
}


@struct.dataclass
class XCiTOutput:
    feature: jax.Array  # (B, D): final-norm CLS token, the DINO feature
    patch_tokens: jax.Array  # (B, N, D): final-norm patch tokens


class XCiT(nn.Module):
    """Conv patch embedding + Fourier positions, XCA blocks, then CLS class-attention blocks.

    Inputs are NHWC images of any size. `train` switches stochastic depth (rng "drop_path";
    one rate for every XCA block and none in the class-attention blocks, as xcit.py);
    `use_running_average=False` runs the BatchNorms of the patch embedding and the LPIs on
    batch statistics and updates their running ones (apply with `mutable=["batch_stats"]`).
    With `mutable=["intermediates"]` the call also records `patch_tokens` (conv stack
    output), `pos_encoding` (1, N, D) and `xca_out` (tokens after the XCA blocks).
    """

    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    eta: float = 1.0  # layer-scale init of every gamma
    tokens_norm: bool = True
    cls_attn_layers: int = 2
    drop_path_rate: float = 0.0
    gelu: str = "exact"  # a vit.GELUS name, for every GELU (official: exact)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, use_running_average: bool = True
    ) -> XCiTOutput:
        layers = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        block = {"num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio}
        block |= {"qkv_bias": self.qkv_bias, "eta": self.eta, "gelu": self.gelu}

        grid = ConvPatchEmbed(
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            gelu=self.gelu,
            name="patch_embed",
            **layers,
        )(x.astype(self.dtype), use_running_average)
        batch, rows, cols, dim = grid.shape
        tokens = grid.reshape(batch, rows * cols, dim)  # row-major over the patch grid
        self.sow("intermediates", "patch_tokens", tokens)

        pos = PositionalEncodingFourier(embed_dim=dim, name="pos_embeder", **layers)(rows, cols)
        self.sow("intermediates", "pos_encoding", pos)
        x = tokens + pos.astype(self.dtype)

        for i in range(self.depth):
            blk = XCABlock(
                drop_path_rate=self.drop_path_rate, name=f"blocks_{i}", **block, **layers
            )
            x = blk(x, rows, cols, train, use_running_average)
        self.sow("intermediates", "xca_out", x)

        cls_token = self.param("cls_token", trunc_normal_02, (1, 1, dim), self.param_dtype)
        cls = jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, dim))
        x = jnp.concatenate([cls, x], axis=1)
        for i in range(self.cls_attn_layers):
            x = ClassAttentionBlock(
                tokens_norm=self.tokens_norm, name=f"cls_attn_blocks_{i}", **block, **layers
            )(x)

        x = nn.LayerNorm(epsilon=LN_EPS, name="norm", **layers)(x)
        return XCiTOutput(feature=x[:, 0], patch_tokens=x[:, 1:])


def build_xcit(arch: str, **overrides: Any) -> XCiT:
    """An XCiT by official name (`xcit_small_12_p16`, `xcit_medium_24_p8`, ...)."""
    if arch not in XCIT_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(XCIT_ARCHS)}")
    return XCiT(**{**XCIT_ARCHS[arch], **overrides})
