"""The DINOv2 Vision Transformer (dinov2/models/vision_transformer.py, DinoVisionTransformer).

Beyond DINO v1's ViT: register tokens, LayerScale, a SwiGLU feed-forward option, a mask token
for iBOT, patch 14 and DINOv2's position-embedding resize. Parameter names mirror the official
state dict with `block_chunks=0` (`blocks.0.ls1.gamma` -> `blocks_0/ls1/gamma`), the layout of
the released backbones, so dino_jax.interop.state_dict maps them one to one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from dino_jax.models.pos_embed2 import interpolate_pos_embed2
from dino_jax.models.vit import (
    Attention,
    Mlp,
    PatchEmbed,
    _Layers,
    remat_block,
    trunc_normal_02,
)

# Sizes of dinov2/models/vision_transformer.py's vit_small / vit_base / vit_large / vit_giant2;
# the released backbones use patch 14, img_size 518 and LayerScale init 1 (hub/backbones.py).
DINOV2_ARCHS: dict[str, dict[str, Any]] = {
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "vit_giant2": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn": "swiglufused"},
}
FFNS = ("mlp", "swiglufused")


@struct.dataclass
class ViT2Output:
    cls: jax.Array  # (B, D): final-norm CLS token (x_norm_clstoken)
    register_tokens: jax.Array  # (B, R, D): final-norm registers (x_norm_regtokens)
    patch_tokens: jax.Array  # (B, N, D): final-norm patch tokens (x_norm_patchtokens)
    prenorm: jax.Array  # (B, 1 + R + N, D): all tokens before the final norm (x_prenorm)
    # final-norm (B, 1 + N, D) outputs of the last n blocks, CLS then patches, registers
    # dropped: get_intermediate_layers(norm=True) in DINO v1's layout
    intermediates: tuple[jax.Array, ...]

    @property
    def feature(self) -> jax.Array:
        """The image feature every backbone gives DINO: here the CLS token."""
        return self.cls


class LayerScale(nn.Module):
    """x * gamma, one learned scale per channel (dinov2/layers/layer_scale.py)."""

    init_values: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.constant(self.init_values)
        gamma = self.param("gamma", init, (x.shape[-1],), self.param_dtype)
        return x * gamma.astype(x.dtype)


class SwiGLUFFNFused(_Layers):
    """w3(silu(x1) * x2) with [x1 | x2] = w12(x): the plain-PyTorch SwiGLUFFN that
    dinov2/layers/swiglu_ffn.py's SwiGLUFFNFused falls back to without xFormers (xFormers'
    SwiGLU keeps the same w12 / w3 weights). The hidden width is 2/3 of the MLP's, rounded
    up to a multiple of 8."""

    hidden_dim: int = 1536  # the MLP's int(D * mlp_ratio), before the 2/3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = (int(self.hidden_dim * 2 / 3) + 7) // 8 * 8
        x1, x2 = jnp.split(self.dense(2 * hidden, "w12")(x), 2, axis=-1)  # first half gated
        return self.dense(x.shape[-1], "w3")(jax.nn.silu(x1) * x2)


def add_residual_subset(
    x: jax.Array, residual_fn: Callable[[jax.Array], jax.Array], rate: float, key: jax.Array
) -> jax.Array:
    """Stochastic depth on a random subset of the batch (block.py's
    drop_add_residual_stochastic_depth): the branch runs on max(int(B (1 - rate)), 1)
    samples drawn without replacement, and is added to them scaled by B / that number; the
    other samples skip it. Unlike per-sample Bernoulli drop path, the kept count is fixed
    and the dropped samples cost no compute."""
    batch = x.shape[0]
    kept = max(int(batch * (1 - rate)), 1)
    index = jax.random.permutation(key, batch)[:kept]
    residual = residual_fn(x[index]).astype(x.dtype)
    return x.at[index].add(residual * (batch / kept))


def add_residual_bernoulli(
    x: jax.Array, residual_fn: Callable[[jax.Array], jax.Array], rate: float, key: jax.Array
) -> jax.Array:
    """Per-sample drop path (layers/drop_path.py, DINO v1's): each sample keeps the branch
    with probability 1 - rate, rescaled by 1 / (1 - rate)."""
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    branch = residual_fn(x)
    return x + jnp.where(keep, branch / keep_prob, jnp.zeros_like(branch))


class Block2(_Layers):
    """x += ls1(attn(norm1(x))); x += ls2(ffn(norm2(x))) (dinov2/layers/block.py)."""

    num_heads: int = 6
    mlp_ratio: float = 4.0
    ffn: str = "mlp"
    init_values: float | None = None
    drop_path: float = 0.0
    drop_path_subset: bool = True
    attention_impl: str | None = None
    attention_pad: int = 0
    gelu: str = "exact"

    def _scale(self, name: str) -> Callable[[jax.Array], jax.Array]:
        if not self.init_values:  # None or 0: no LayerScale, as the official nn.Identity
            return lambda y: y
        return LayerScale(self.init_values, param_dtype=self.param_dtype, name=name)

    def _add(self, x: jax.Array, residual_fn, train: bool) -> jax.Array:
        if not train or self.drop_path == 0.0:
            return x + residual_fn(x)
        add = add_residual_subset if self.drop_path_subset else add_residual_bernoulli
        return add(x, residual_fn, self.drop_path, self.make_rng("drop_path"))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        layers = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        norm1, norm2 = self.norm("norm1"), self.norm("norm2")
        attn = Attention(
            num_heads=self.num_heads,
            implementation=self.attention_impl,
            pad_to=self.attention_pad,
            name="attn",
            **layers,
        )
        hidden = int(x.shape[-1] * self.mlp_ratio)
        if self.ffn == "mlp":
            ffn = Mlp(hidden_dim=hidden, gelu=self.gelu, name="mlp", **layers)
        else:
            ffn = SwiGLUFFNFused(hidden_dim=hidden, name="mlp", **layers)
        ls1, ls2 = self._scale("ls1"), self._scale("ls2")
        x = self._add(x, lambda y: ls1(attn(norm1(y))[0]), train)
        return self._add(x, lambda y: ls2(ffn(norm2(y))), train)


class DinoVisionTransformer(_Layers):
    """DINOv2's ViT on NHWC images whose sides are multiples of `patch_size`.

    Tokens are [cls, registers, patches]: the position embedding (interpolated as DINOv2
    does) is added to CLS and patches before the registers are inserted, so registers have
    none. `masks` (B, N) bool replaces those patch embeddings by `mask_token` first
    (prepare_tokens_with_masks), the student's input of iBOT. Stochastic depth (train=True,
    rng "drop_path") follows the training path of NestedTensorBlock: a random subset of each
    call's batch per branch (drop_path_subset), or per-sample Bernoulli; the official draws
    its subset per GPU, ours over the (global) batch of the call.
    """

    patch_size: int = 14
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    ffn: str = "mlp"  # "mlp" | "swiglufused" (the official "swiglu" is the same layer)
    num_register_tokens: int = 0
    init_values: float | None = None  # LayerScale init; None / 0: no LayerScale
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    img_size: int = 224  # sets the stored position grid: (img_size // patch_size)^2
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False  # every block at drop_path_rate (DINOv2's configs: True)
    drop_path_subset: bool = True
    attention_impl: str | None = None  # jax.nn.dot_product_attention implementation
    attention_pad: int = 0  # vit.fused_attention's token padding (0: none)
    gelu: str = "exact"  # vit.GELUS name of the MLP's activation (ffn="mlp")
    remat: str = "none"  # vit.REMATS name: activation checkpointing of each block

    def _drop_rates(self) -> list[float]:
        if self.drop_path_uniform:
            return [self.drop_path_rate] * self.depth
        return [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]

    def _tokens(self, x: jax.Array, masks: jax.Array | None) -> jax.Array:
        p = self.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(
                f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of the patch size {p}"
            )
        layers = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        patches = PatchEmbed(patch_size=p, embed_dim=self.embed_dim, name="patch_embed", **layers)
        tokens = patches(x.astype(self.dtype))
        batch, rows, cols, dim = tokens.shape
        tokens = tokens.reshape(batch, rows * cols, dim)  # row-major over the patch grid
        grid = self.img_size // p
        pd = self.param_dtype
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim), pd)
        pos_embed = self.param("pos_embed", trunc_normal_02, (1, 1 + grid * grid, dim), pd)
        # Created even when unused, so every call sees the same params (official: zeros).
        mask_token = self.param("mask_token", nn.initializers.zeros, (1, dim), pd)
        if masks is not None:
            if masks.shape != (batch, rows * cols):
                raise ValueError(f"masks {masks.shape} != (batch, patches) {(batch, rows * cols)}")
            tokens = jnp.where(masks[..., None], mask_token.astype(self.dtype), tokens)
        cls = jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, dim))
        x = jnp.concatenate([cls, tokens], axis=1)
        pos = interpolate_pos_embed2(
            pos_embed,
            rows,
            cols,
            offset=self.interpolate_offset,
            antialias=self.interpolate_antialias,
        )
        x = x + pos.astype(self.dtype)
        if not self.num_register_tokens:
            return x
        shape = (1, self.num_register_tokens, dim)
        registers = self.param("register_tokens", nn.initializers.normal(1e-6), shape, pd)
        registers = jnp.broadcast_to(registers.astype(self.dtype), (batch, *shape[1:]))
        return jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        use_running_average: bool = True,
        masks: jax.Array | None = None,
        n_last_blocks: int = 0,
    ) -> ViT2Output:
        """`use_running_average` is there for the backbone interface (BatchNorm mode) and
        unused: the ViT has no BatchNorm."""
        del use_running_average
        if self.ffn not in FFNS:
            raise ValueError(f"ffn={self.ffn!r} is not one of {FFNS}")
        if not 0 <= n_last_blocks <= self.depth:
            raise ValueError(f"n_last_blocks={n_last_blocks} outside [0, depth={self.depth}]")
        x = self._tokens(x, masks)
        first_patch = 1 + self.num_register_tokens
        final_norm = self.norm("norm")
        intermediates = []
        block = remat_block(Block2, self.remat, static_argnums=(2,))  # train
        for i, rate in enumerate(self._drop_rates()):
            x = block(
                num_heads=self.num_heads,
                mlp_ratio=self.mlp_ratio,
                ffn=self.ffn,
                init_values=self.init_values,
                drop_path=rate,
                drop_path_subset=self.drop_path_subset,
                attention_impl=self.attention_impl,
                attention_pad=self.attention_pad,
                gelu=self.gelu,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{i}",
            )(x, train)
            if i >= self.depth - n_last_blocks:
                y = final_norm(x)
                intermediates.append(jnp.concatenate([y[:, :1], y[:, first_patch:]], axis=1))
        y = final_norm(x)
        return ViT2Output(
            cls=y[:, 0],
            register_tokens=y[:, 1:first_patch],
            patch_tokens=y[:, first_patch:],
            prenorm=x,
            intermediates=tuple(intermediates),
        )


def build_dinov2(arch: str, **overrides: Any) -> DinoVisionTransformer:
    """A DINOv2 ViT by official name, with the released backbones' settings (patch 14,
    img_size 518, LayerScale); `overrides` e.g. num_register_tokens=4,
    interpolate_antialias=True, interpolate_offset=0.0 for the `*_reg` backbones."""
    if arch not in DINOV2_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(DINOV2_ARCHS)}")
    released = {"patch_size": 14, "img_size": 518, "init_values": 1.0}
    return DinoVisionTransformer(**{**released, **DINOV2_ARCHS[arch], **overrides})
