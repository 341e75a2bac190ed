"""Student/teacher forward over multi-crop batches: one backbone call per resolution."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dino_jax.models.head import DINOHead
from dino_jax.models.vit import VisionTransformer


class MultiCropNetwork(nn.Module):
    """g = head o backbone over crops grouped by resolution (official MultiCropWrapper).

    `crops` is a sequence of groups, each (B, n_crops_in_group, H, W, C) with one resolution
    per group (global crops first, then local ones). Images stay on the first axis so a batch
    sharded over devices keeps all crops of an image together; the result is crop-major,
    (n_crops, B, K), the order the official code concatenates crops in.
    """

    backbone: VisionTransformer
    head: DINOHead

    def __call__(self, crops: Sequence[jax.Array], *, train: bool = False) -> jax.Array:
        features = []
        for group in crops:
            batch, n = group.shape[:2]
            out = self.backbone(group.reshape(batch * n, *group.shape[2:]), train=train)
            features.append(out.cls.reshape(batch, n, -1))
        # One head call on every crop at once, as the official wrapper does (it matters for
        # batch-norm statistics when the head uses them).
        logits = self.head(jnp.concatenate(features, axis=1))  # (B, n_crops, K)
        return jnp.swapaxes(logits, 0, 1)
