"""Analytic matmul FLOPs of the DINO training step, the numerator of bench step's MFU."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from dino_jax import recipe
from dino_jax.models.backbones import family, vit_sizes


def vit_forward_flops(dim: int, depth: int, tokens: int, patch: int, mlp_ratio: float = 4.0):
    """Matmul FLOPs of one ViT forward on one image of `tokens` (CLS included) tokens."""
    per_block = (
        2 * tokens * dim * 3 * dim  # qkv
        + 2 * 2 * tokens * tokens * dim  # q k^T and attn v
        + 2 * tokens * dim * dim  # proj
        + 2 * 2 * tokens * dim * int(dim * mlp_ratio)  # fc1, fc2
    )
    patch_embed = 2 * (tokens - 1) * 3 * patch * patch * dim
    return depth * per_block + patch_embed


def head_forward_flops(dim: int, nlayers: int, hidden: int, bottleneck: int, out_dim: int):
    widths = [dim] + [hidden] * (nlayers - 1) + [bottleneck]
    mlp = sum(2 * a * b for a, b in itertools.pairwise(widths))
    return mlp + 2 * bottleneck * out_dim


def backbone_forward_flops(config, size: int) -> float:
    """FLOPs of one backbone forward on one size x size crop: analytic for a ViT; for a
    ResNet or XCiT the count XLA makes of the lowered (not compiled) forward."""
    m = config.model
    if family(m.arch) == "vit":
        arch = vit_sizes(m)
        tokens = (size // m.patch_size) ** 2 + 1
        return vit_forward_flops(arch["embed_dim"], arch["depth"], tokens, m.patch_size)
    backbone = recipe.build_network(config).backbone
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(backbone.init, jax.random.key(0), image)
    lowered = jax.jit(lambda v, x: backbone.apply(v, x).feature).lower(variables, image)
    return float(lowered.cost_analysis()["flops"])


def dino_flops_per_image(config) -> float:
    """Analytic FLOPs of one training step per source image: the student's forward and
    backward (3x forward) on every crop and the teacher's forward on the global crops."""
    m, a = config.model, config.aug
    dim = recipe.build_network(config).backbone.embed_dim
    head = head_forward_flops(
        dim, m.head_nlayers, m.head_hidden_dim, m.head_bottleneck_dim, m.out_dim
    )

    def crop(size):
        return backbone_forward_flops(config, size) + head

    student = a.n_global * crop(a.global_size) + a.n_local * crop(a.local_size)
    teacher = a.n_global * crop(a.global_size)
    return 3 * student + teacher
