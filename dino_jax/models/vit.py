"""Vision Transformer backbone as in the official DINO code, as pure Flax linen modules.

Parameter names mirror the official state-dict names (`blocks_0/attn/qkv` for
`blocks.0.attn.qkv`), so official checkpoints map onto these params one to one.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from dino_jax.models.pos_embed import interpolate_pos_embed

Dtype = Any

# Official sizes (vision_transformer.py: vit_tiny / vit_small / vit_base; vit_large as in DeiT).
ARCHS: dict[str, dict[str, int]] = {
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}

LN_EPS = 1e-6  # official norm_layer = partial(nn.LayerNorm, eps=1e-6)

# trunc_normal_(std=.02) with absolute bounds +-2 is N(0, .02^2) in practice; JAX's
# truncated_normal(.02) would cut at +-2 sigma instead.
trunc_normal_02 = nn.initializers.normal(0.02)


def torch_default_uniform(fan_in: int):
    """PyTorch's default Linear/Conv init of weight and bias: U(+-1/sqrt(fan_in))."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def exact_gelu(x: jax.Array) -> jax.Array:
    # The official MLP uses nn.GELU() (erf form); jax.nn.gelu defaults to the tanh form.
    return nn.gelu(x, approximate=False)


def tanh_gelu(x: jax.Array) -> jax.Array:
    """GELU's tanh approximation (Hendrycks & Gimpel 2016, section 2), at most 4.8e-4 from
    the exact one: not the official function but a speed option (GPU matmuls can fuse it into
    their epilogue, where the erf form tends to become a kernel of its own)."""
    return nn.gelu(x, approximate=True)


# model.gelu: the activation of every MLP (and of XCiT's convolutions)
GELUS = ("exact", "tanh")


def gelu_fn(name: str):
    """The GELU called `name`: "exact" (exact_gelu, the official nn.GELU) or "tanh"."""
    if name == "exact":
        return exact_gelu
    if name == "tanh":
        return tanh_gelu
    raise ValueError(f"gelu={name!r} is not one of {GELUS}")


# model.remat: what a block keeps for the backward pass. "block" keeps only its input and
# recomputes the rest; "dots" also keeps the outputs of its matmuls without batch dimensions
# (the Dense layers'), recomputing the attention, norms and activations.
REMAT_POLICIES = {"block": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
REMATS = ("none", *REMAT_POLICIES)


@functools.cache  # one class per block kind and setting, however many calls
def remat_block(block: type[nn.Module], remat: str, static_argnums: tuple[int, ...]):
    """`block` itself ("none"), or the block class whose activations are recomputed in the
    backward pass (flax nn.remat): the same params (names included), values, gradients and
    RNG draws, less activation memory for more compute. `static_argnums`: the positions of
    its Python (bool) arguments, counting `self` as 0."""
    if remat not in REMATS:
        raise ValueError(f"remat={remat!r} is not one of {REMATS}")
    if remat == "none":
        return block
    return nn.remat(block, static_argnums=static_argnums, policy=REMAT_POLICIES[remat])


def fused_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None, pad_to: int = 0
) -> jax.Array:
    """jax.nn.dot_product_attention of (B, N, heads, head_dim) q, k, v -> (B, N, heads,
    head_dim). With `pad_to` > 0 the token axis is zero-padded up to a multiple of it, the
    padded keys masked out (key_value_seq_lengths = N), and the padded queries dropped: the
    same attention, on sequence lengths fused kernels accept (cuDNN refuses N = 197 = 14 * 14
    + 1 in training). Padded queries attend to the real keys only, so no row is empty."""
    tokens = q.shape[1]
    padded = -(-tokens // pad_to) * pad_to if pad_to else tokens
    if padded == tokens:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    widths = ((0, 0), (0, padded - tokens), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    lengths = jnp.full((q.shape[0],), tokens, jnp.int32)
    out = jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=lengths, implementation=implementation
    )
    return out[:, :tokens]


@struct.dataclass
class ViTOutput:
    cls: jax.Array  # (B, D): final-norm CLS token, the DINO feature
    patch_tokens: jax.Array  # (B, N, D): final-norm patch tokens
    attention: jax.Array | None  # (B, heads, 1 + N, 1 + N), last block, when requested
    intermediates: tuple[jax.Array, ...]  # final-norm outputs (B, 1 + N, D) of the last n blocks

    @property
    def feature(self) -> jax.Array:
        """The image feature every backbone gives DINO: here the CLS token."""
        return self.cls


class _Layers(nn.Module):
    """Shared dtype/init plumbing for the ViT's Dense and LayerNorm layers."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def dense(self, features: int, name: str, use_bias: bool = True) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=trunc_normal_02,
            bias_init=nn.initializers.zeros,
            name=name,
        )

    def norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(
            epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )


class Attention(_Layers):
    num_heads: int = 6
    qkv_bias: bool = True
    implementation: str | None = None
    pad_to: int = 0  # fused_attention's token padding (0: none)

    @nn.compact
    def __call__(self, x: jax.Array, return_weights: bool = False):
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = self.dense(3 * dim, "qkv", use_bias=self.qkv_bias)(x)
        # Output features are ordered (q|k|v, head, head_dim), as the official reshape.
        q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 2, 0)
        weights = None
        if return_weights:
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
            weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        else:
            # The fused path (cuDNN flash attention on GPUs when asked for) whenever the
            # weights themselves are not needed; the maps above are never padded.
            out = fused_attention(q, k, v, self.implementation, self.pad_to)
        return self.dense(dim, "proj")(out.reshape(batch, tokens, dim)), weights


class Mlp(_Layers):
    hidden_dim: int = 1536
    gelu: str = "exact"  # a GELUS name

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = gelu_fn(self.gelu)(self.dense(self.hidden_dim, "fc1")(x))
        return self.dense(x.shape[-1], "fc2")(y)


class Block(_Layers):
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    attention_impl: str | None = None
    attention_pad: int = 0
    gelu: str = "exact"

    def _drop_path(self, branch: jax.Array, train: bool) -> jax.Array:
        """Stochastic depth: drop a residual branch per sample, rescale the kept ones."""
        if not train or self.drop_path == 0.0:
            return branch
        keep_prob = 1.0 - self.drop_path
        shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)
        keep = jax.random.bernoulli(self.make_rng("drop_path"), keep_prob, shape)
        return jnp.where(keep, branch / keep_prob, jnp.zeros_like(branch))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_attention: bool = False):
        layers = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        attn = Attention(
            num_heads=self.num_heads,
            qkv_bias=self.qkv_bias,
            implementation=self.attention_impl,
            pad_to=self.attention_pad,
            name="attn",
            **layers,
        )
        y, weights = attn(self.norm("norm1")(x), return_attention)
        x = x + self._drop_path(y, train)
        hidden = int(x.shape[-1] * self.mlp_ratio)
        mlp = Mlp(hidden_dim=hidden, gelu=self.gelu, name="mlp", **layers)
        x = x + self._drop_path(mlp(self.norm("norm2")(x)), train)
        return x, weights


class PatchEmbed(_Layers):
    patch_size: int = 16
    embed_dim: int = 384

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        fan_in = x.shape[-1] * p * p
        return nn.Conv(
            self.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            # The official code leaves the patch projection at PyTorch's default init.
            kernel_init=torch_default_uniform(fan_in),
            bias_init=torch_default_uniform(fan_in),
            name="proj",
        )(x)


class VisionTransformer(_Layers):
    """The official DINO ViT: conv patch embedding with bias, CLS token, pre-norm blocks.

    Inputs are NHWC images; any size whose sides are multiples of `patch_size` (the position
    embedding is interpolated as the official code does).
    """

    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    img_size: int = 224  # sets the stored position grid: (img_size // patch_size)^2
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over the blocks
    attention_impl: str | None = None  # jax.nn.dot_product_attention implementation
    attention_pad: int = 0  # fused_attention's token padding (0: none)
    gelu: str = "exact"  # a GELUS name
    remat: str = "none"  # a REMATS name: activation checkpointing of each block

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        use_running_average: bool = True,
        return_attention: bool = False,
        n_last_blocks: int = 0,
    ) -> ViTOutput:
        """`train` switches stochastic depth; `use_running_average` is there for the backbone
        interface (BatchNorm mode) and unused: the ViT has no BatchNorm."""
        del use_running_average
        p = self.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(
                f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of the patch size {p}"
            )
        if not 0 <= n_last_blocks <= self.depth:
            raise ValueError(f"n_last_blocks={n_last_blocks} outside [0, depth={self.depth}]")
        tokens = PatchEmbed(
            patch_size=p,
            embed_dim=self.embed_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embed",
        )(x.astype(self.dtype))
        batch, rows, cols, dim = tokens.shape
        tokens = tokens.reshape(batch, rows * cols, dim)  # row-major over the patch grid

        grid = self.img_size // p
        cls_token = self.param("cls_token", trunc_normal_02, (1, 1, dim), self.param_dtype)
        pos_embed = self.param(
            "pos_embed", trunc_normal_02, (1, 1 + grid * grid, dim), self.param_dtype
        )
        cls = jnp.broadcast_to(cls_token, (batch, 1, dim)).astype(self.dtype)
        x = jnp.concatenate([cls, tokens], axis=1)
        x = x + interpolate_pos_embed(pos_embed, rows, cols).astype(self.dtype)

        final_norm = self.norm("norm")
        rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
        intermediates = []
        weights = None
        block = remat_block(Block, self.remat, static_argnums=(2, 3))  # train, return_attention
        for i in range(self.depth):
            last = i == self.depth - 1
            x, weights = block(
                num_heads=self.num_heads,
                mlp_ratio=self.mlp_ratio,
                qkv_bias=self.qkv_bias,
                drop_path=rates[i],
                attention_impl=self.attention_impl,
                attention_pad=self.attention_pad,
                gelu=self.gelu,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{i}",
            )(x, train, return_attention and last)
            if i >= self.depth - n_last_blocks:
                intermediates.append(final_norm(x))
        x = final_norm(x)
        return ViTOutput(
            cls=x[:, 0],
            patch_tokens=x[:, 1:],
            attention=weights,
            intermediates=tuple(intermediates),
        )


def build_vit(arch: str, **overrides: Any) -> VisionTransformer:
    """A ViT by official name (`vit_tiny`, `vit_small`, `vit_base`, `vit_large`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    return VisionTransformer(**{**ARCHS[arch], **overrides})
