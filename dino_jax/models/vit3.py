"""The DINOv3 Vision Transformer (dinov3/models/vision_transformer.py's DinoVisionTransformer).

Against the DINO ViT of vit.py: no absolute position embedding (RoPE in every block, so any
input size works without interpolation), storage (register) tokens after the CLS token,
LayerScale, a SwiGLU feed-forward aligned to a multiple of 64, and a qkv layer whose k bias
is ignored. Parameter names are the official state-dict names (`blocks_0/mlp/w1` for
`blocks.0.mlp.w1`); `from_official_state_dict` drops and checks the two official buffers.
This module holds the backbone, its sizes and the state-dict import; vit3_layers.py holds
its layers (the block, RoPE attention, SwiGLU feed-forward and qkv projection).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dino_jax.interop.state_dict import from_state_dict
from dino_jax.models import rope
from dino_jax.models.vit import PatchEmbed, _Layers, remat_block, trunc_normal_02
from dino_jax.models.vit3_layers import SWIGLU_ALIGN, Block, k_bias_mask

# dinov3/models/vision_transformer.py's sizes (vit_small ... vit_7b).
ARCHS: dict[str, dict[str, Any]] = {
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6, "ffn_ratio": 4.0},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "ffn_ratio": 4.0},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "ffn_ratio": 4.0},
    "vit_so400m": {"embed_dim": 1152, "depth": 27, "num_heads": 18, "ffn_ratio": 3.777777778},
    "vit_huge2": {"embed_dim": 1280, "depth": 32, "num_heads": 20, "ffn_ratio": 4.0},
    "vit_giant2": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn_ratio": 4.0},
    "vit_7b": {"embed_dim": 4096, "depth": 40, "num_heads": 32, "ffn_ratio": 3.0},
}

# The official norm_layer names: "layernormbf16" is a LayerNorm with eps 1e-5 (the configs').
NORM_EPS = {"layernorm": 1e-6, "layernormbf16": 1e-5}
ROPE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


@struct.dataclass
class ViT3Output:
    cls: jax.Array  # (B, D): final-norm CLS token (x_norm_clstoken), the DINO feature
    storage_tokens: jax.Array  # (B, n_storage, D): final-norm storage tokens
    patch_tokens: jax.Array  # (B, HW, D): final-norm patch tokens (x_norm_patchtokens)
    prenorm: jax.Array  # (B, 1 + n_storage + HW, D): last block's output (x_prenorm)
    # final-norm (B, 1 + HW, D) outputs of the last n blocks, CLS then patches, storage tokens
    # dropped: get_intermediate_layers(norm=True) in DINO v1's layout (the linear probe's)
    intermediates: tuple[jax.Array, ...] = ()

    @property
    def feature(self) -> jax.Array:
        return self.cls


class VisionTransformer3(_Layers):
    """DinoVisionTransformer: tokens [CLS, storage_0..n-1, patches (row-major)], RoPE blocks,
    one final LayerNorm (or, with `untie_cls_and_patch_norms`, `cls_norm` for CLS and storage
    tokens). NHWC input of any size whose sides are multiples of `patch_size`.

    Defaults are the official constructor's (the recipes override many: ViT-L distilled sets
    norm_layer "layernormbf16", 4 storage tokens, mask_k_bias, RoPE rescale 2, layerscale
    1e-5). In training (`train=True`) the configured RoPE coordinate augmentations are drawn
    per block from the "rope" RNG stream (the official module is called once per block) and
    stochastic depth from "drop_path"; the teachers run in eval mode, as the official ones do.
    Not covered: untie_global_and_local_cls_norm, RMSNorm, the official `forward_features`
    list mode (one call per resolution here, as for every backbone of this package).
    """

    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_ratio: float = 4.0
    ffn_layer: str = "mlp"  # "mlp" (GELU, fc1/fc2), "swiglu", "swiglu32/64/128"
    norm_layer: str = "layernorm"  # or "layernormbf16" (eps 1e-5)
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    mask_k_bias: bool = False
    layerscale_init: float | None = None
    n_storage_tokens: int = 0
    untie_cls_and_patch_norms: bool = False
    drop_path_rate: float = 0.0  # the same rate in every block, as the official
    rope_base: float | None = 100.0
    rope_min_period: float | None = None
    rope_max_period: float | None = None
    rope_normalize_coords: str = "separate"
    rope_shift_coords: float | None = None
    rope_jitter_coords: float | None = None
    rope_rescale_coords: float | None = None
    rope_dtype: str = "bf16"  # "fp32", "bf16" or "fp16": the arithmetic of sin / cos and q, k
    attention_impl: str | None = None
    attention_pad: int = 0  # vit.fused_attention's token padding (0: none)
    gelu: str = "exact"  # vit.GELUS name of the MLP's activation (ffn_layer="mlp")
    remat: str = "none"  # vit.REMATS name: activation checkpointing of each block

    def norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(
            epsilon=NORM_EPS[self.norm_layer],
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def rope_kwargs(self) -> dict[str, Any]:
        return dict(
            head_dim=self.embed_dim // self.num_heads,
            base=self.rope_base,
            min_period=self.rope_min_period,
            max_period=self.rope_max_period,
            normalize_coords=self.rope_normalize_coords,
            shift_coords=self.rope_shift_coords,
            jitter_coords=self.rope_jitter_coords,
            rescale_coords=self.rope_rescale_coords,
            dtype=ROPE_DTYPES[self.rope_dtype],
        )

    def _augments_rope(self, train: bool) -> bool:
        augmentations = (self.rope_shift_coords, self.rope_jitter_coords, self.rope_rescale_coords)
        return train and any(a is not None for a in augmentations)

    def _sin_cos(self, rows: int, cols: int, train: bool):
        key = self.make_rng("rope") if self._augments_rope(train) else None
        return rope.rope_embedding(rows, cols, **self.rope_kwargs(), key=key)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        use_running_average: bool = True,
        masks: jax.Array | None = None,
        n_last_blocks: int = 0,
    ) -> ViT3Output:
        """x: (B, H, W, C). masks: optional (B, HW) bool, True where a patch token is replaced
        by `mask_token` (iBOT). `n_last_blocks`: also the final-norm outputs of that many last
        blocks (`intermediates`). `use_running_average` is unused (no BatchNorm)."""
        del use_running_average
        if not 0 <= n_last_blocks <= self.depth:
            raise ValueError(f"n_last_blocks={n_last_blocks} outside [0, depth={self.depth}]")
        if self.norm_layer not in NORM_EPS:
            raise ValueError(f"norm_layer={self.norm_layer!r}, not one of {sorted(NORM_EPS)}")
        if self.ffn_layer != "mlp" and self.ffn_layer not in SWIGLU_ALIGN:
            raise ValueError(f"unknown ffn_layer {self.ffn_layer!r}")
        if self.ffn_layer == "mlp" and not self.ffn_bias:
            raise ValueError('ffn_layer="mlp" here always has biases (ffn_bias=False unsupported)')
        p = self.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(
                f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of the patch size {p}"
            )
        layers = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        tokens = PatchEmbed(patch_size=p, embed_dim=self.embed_dim, name="patch_embed", **layers)(
            x.astype(self.dtype)
        )
        batch, rows, cols, dim = tokens.shape
        tokens = tokens.reshape(batch, rows * cols, dim)  # row-major over the patch grid

        cls_token = self.param("cls_token", trunc_normal_02, (1, 1, dim), self.param_dtype)
        prefix = [jnp.broadcast_to(cls_token, (batch, 1, dim)).astype(self.dtype)]
        if self.n_storage_tokens:
            storage = self.param(
                "storage_tokens", trunc_normal_02, (1, self.n_storage_tokens, dim), self.param_dtype
            )
            prefix.append(jnp.broadcast_to(storage, (batch, self.n_storage_tokens, dim)))
        mask_token = self.param("mask_token", nn.initializers.zeros, (1, dim), self.param_dtype)
        if masks is not None:
            tokens = jnp.where(masks[..., None], mask_token.astype(self.dtype), tokens)
        x = jnp.concatenate([*(t.astype(self.dtype) for t in prefix), tokens], axis=1)

        # Without augmentation every block gets the same sin / cos: computed once.
        sin_cos = None if self._augments_rope(train) else self._sin_cos(rows, cols, train)
        norms = (
            self.norm("cls_norm") if self.untie_cls_and_patch_norms else None,
            self.norm("norm"),
        )
        intermediates = []
        block = remat_block(Block, self.remat, static_argnums=(3,))  # train
        for i in range(self.depth):
            x = block(
                num_heads=self.num_heads,
                ffn_ratio=self.ffn_ratio,
                ffn_layer=self.ffn_layer,
                qkv_bias=self.qkv_bias,
                proj_bias=self.proj_bias,
                ffn_bias=self.ffn_bias,
                mask_k_bias=self.mask_k_bias,
                layerscale_init=self.layerscale_init,
                drop_path=self.drop_path_rate,
                attention_impl=self.attention_impl,
                attention_pad=self.attention_pad,
                gelu=self.gelu,
                norm_eps=NORM_EPS[self.norm_layer],
                name=f"blocks_{i}",
                **layers,
            )(x, sin_cos or self._sin_cos(rows, cols, train), train)
            if i >= self.depth - n_last_blocks:
                prefix_out, patch = self._final_norm(x, *norms)
                intermediates.append(jnp.concatenate([prefix_out[:, :1], patch], axis=1))

        prefix_out, patch = self._final_norm(x, *norms)
        return ViT3Output(
            cls=prefix_out[:, 0],
            storage_tokens=prefix_out[:, 1:],
            patch_tokens=patch,
            prenorm=x,
            intermediates=tuple(intermediates),
        )

    def _final_norm(self, x: jax.Array, cls_norm, norm) -> tuple[jax.Array, jax.Array]:
        """(CLS and storage tokens, patch tokens) of (B, 1 + n_storage + HW, D) tokens after
        the final norm: `norm` over all, or `cls_norm` over the first and `norm` over the
        patches when they are untied (`cls_norm` is then not None)."""
        n_prefix = 1 + self.n_storage_tokens
        if cls_norm is not None:
            return cls_norm(x[:, :n_prefix]), norm(x[:, n_prefix:])
        normed = norm(x)
        return normed[:, :n_prefix], normed[:, n_prefix:]


def build_vit3(arch: str, **overrides: Any) -> VisionTransformer3:
    """A DINOv3 ViT by official name (`vit_small` ... `vit_7b`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    return VisionTransformer3(**{**ARCHS[arch], **overrides})


def from_official_state_dict(
    model: VisionTransformer3 | Block, state_dict: Mapping[str, Any], prefix: str = ""
) -> dict[str, Any]:
    """Flax params of an official DinoVisionTransformer (or SelfAttentionBlock) state dict.

    The official buffers are not parameters here: `*.qkv.bias_mask` must be the mask the
    model applies (a NaN mask is an uninitialised official model) and `rope_embed.periods`
    must be the periods the model's RoPE settings give; both are then dropped.
    """
    params_sd = {}
    for name, value in state_dict.items():
        if not name.startswith(prefix):
            continue
        value = np.asarray(value)
        if name.endswith(".bias_mask"):
            want = k_bias_mask(value.shape[0]) if model.mask_k_bias else np.ones(value.shape)
            if not np.array_equal(value, want):
                raise ValueError(f"{name} is not the k-bias mask this model applies")
        elif name.endswith("rope_embed.periods"):
            kwargs = model.rope_kwargs()
            want = rope.rope_periods(
                kwargs["head_dim"],
                base=kwargs["base"],
                min_period=kwargs["min_period"],
                max_period=kwargs["max_period"],
                dtype=kwargs["dtype"],
            )
            want = np.asarray(want, np.float32)
            if not np.allclose(value.astype(np.float32), want, rtol=1e-6, atol=0):
                raise ValueError(f"{name} = {value} differs from the periods {want} of this model")
        else:
            params_sd[name] = value
    params, buffers = from_state_dict(params_sd, prefix)
    if buffers:
        raise ValueError(f"unexpected buffers {sorted(buffers)}")
    return params
