"""Student/teacher forward over multi-crop batches: one backbone call per resolution."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dino_jax.models.head import DINOHead


class MultiCropNetwork(nn.Module):
    """g = head o backbone over crops grouped by resolution (official MultiCropWrapper).

    `crops` is a sequence of groups, each (B, n_crops_in_group, H, W, C) with one resolution
    per group (global crops first, then local ones). Images stay on the first axis so a batch
    sharded over devices keeps all crops of an image together; the result is crop-major,
    (n_crops, B, K), the order the official code concatenates crops in.

    `train` switches stochastic depth (the student's calls); `use_running_average` switches
    BatchNorm layers between running and batch statistics. Both DINO networks normalise with
    batch statistics (the official code never calls `.eval()` while training), so their calls
    pass `use_running_average=False` with `mutable=["batch_stats"]`: each backbone call then
    updates the running statistics once, the global group first, as the official wrapper's
    one call per resolution does.
    """

    backbone: nn.Module  # a ViT, ResNet or XCiT (dino_jax.models.backbones)
    head: DINOHead

    def __call__(
        self,
        crops: Sequence[jax.Array],
        *,
        train: bool = False,
        use_running_average: bool = True,
        return_features: bool = False,
    ):
        """(n_crops, B, K) logits; with `return_features`, also the (n_crops, B, D) backbone
        features the head was applied to."""
        features = []
        for group in crops:
            batch, n = group.shape[:2]
            images = group.reshape(batch * n, *group.shape[2:])
            out = self.backbone(images, train=train, use_running_average=use_running_average)
            features.append(out.feature.reshape(batch, n, -1))
        # One head call on every crop at once, as the official wrapper does (a BatchNorm in
        # the head sees global and local features together).
        features = jnp.concatenate(features, axis=1)  # (B, n_crops, D)
        logits = self.head(features, use_running_average=use_running_average)
        logits = jnp.swapaxes(logits, 0, 1)  # (n_crops, B, K)
        if return_features:
            return logits, jnp.swapaxes(features, 0, 1)
        return logits
