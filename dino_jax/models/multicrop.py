"""Student/teacher forward over multi-crop batches: one backbone call per resolution."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from dino_jax.models.head import DINOHead


@struct.dataclass
class MultiCropOutputs:
    """What one multi-crop call produced, crop-major (global crops first)."""

    logits: jax.Array | None  # (n_crops, B, K) float32: the head on every crop's feature
    features: jax.Array  # (n_crops, B, D): the backbone features the head was applied to
    # (n_global, B, N, D): the global crops' final-norm patch tokens (None: no patch tokens)
    patch_tokens: jax.Array | None = None
    # (n_chunks, capacity, K_patch) float32: the patch head on the gathered masked tokens
    patch_logits: jax.Array | None = None
    # With `head_logits=False` (logits None): the head's L2-normalised bottleneck of every
    # crop, (n_crops, B, d), and its (d, K) float32 prototypes, for a loss that makes the
    # logits itself (dino_jax.loss.dino_cross_entropy_chunked)
    embeddings: jax.Array | None = None
    prototypes: jax.Array | None = None


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

    iBOT (DINOv2's ssl_meta_arch): `masks` (B, n_global, N) bool replaces those patch tokens
    of the global crops by the backbone's mask token (the student's input); `patch_index`
    (n_chunks, capacity) int32 gathers patch tokens of the global crops, each chunk's indices
    into its own images' flattened (images, n_global, N) tokens, and applies `patch_head`
    (iBOT's separate head) or `head` (the shared one) to them.

    `head_logits=False` (with `return_features`) stops the head before its last layer: the
    outputs carry the normalised bottleneck and the prototypes instead of the logits.
    """

    backbone: nn.Module  # a ViT, ResNet or XCiT (dino_jax.models.backbones)
    head: DINOHead
    patch_head: DINOHead | None = None

    def __call__(
        self,
        crops: Sequence[jax.Array],
        *,
        train: bool = False,
        use_running_average: bool = True,
        return_features: bool = False,
        masks: jax.Array | None = None,
        patch_index: jax.Array | None = None,
        head_logits: bool = True,
    ):
        """(n_crops, B, K) logits; with `return_features`, a MultiCropOutputs."""
        if not (head_logits or return_features):
            raise ValueError("head_logits=False gives the head's bottleneck: set return_features")
        features, patch_tokens = [], None
        for i, group in enumerate(crops):
            batch, n = group.shape[:2]
            images = group.reshape(batch * n, *group.shape[2:])
            extra = {}
            if i == 0 and masks is not None:
                extra["masks"] = masks.reshape(batch * n, -1)
            out = self.backbone(
                images, train=train, use_running_average=use_running_average, **extra
            )
            features.append(out.feature.reshape(batch, n, -1))
            if i == 0 and hasattr(out, "patch_tokens"):
                patch_tokens = out.patch_tokens.reshape(batch, n, *out.patch_tokens.shape[1:])
        # One head call on every crop at once, as the official wrapper does (a BatchNorm in
        # the head sees global and local features together).
        # Crop-major before the head: the (n_crops, B, D) features are small, the (n_crops, B,
        # K) logits are not, so they never need a transpose (the head acts per feature; a
        # BatchNorm in it sees the same set of features either way).
        features = jnp.swapaxes(jnp.concatenate(features, axis=1), 0, 1)  # (n_crops, B, D)
        logits = embeddings = prototypes = None
        if head_logits:
            logits = self.head(features, use_running_average=use_running_average)  # (n_crops, B, K)
        else:
            embeddings = self.head.embed(features, use_running_average=use_running_average)
            prototypes = self.head.prototypes()
        patch_logits = None
        if patch_index is not None:
            patch_logits = self._patch_logits(patch_tokens, patch_index, use_running_average)
        elif self.patch_head is not None and self.is_initializing():
            self.patch_head(features[:1, :1])  # its parameters exist from the start
        if not return_features:
            return logits
        return MultiCropOutputs(
            logits=logits,
            features=features,
            patch_tokens=None if patch_tokens is None else jnp.swapaxes(patch_tokens, 0, 1),
            patch_logits=patch_logits,
            embeddings=embeddings,
            prototypes=prototypes,
        )

    def _patch_logits(self, patch_tokens, patch_index, use_running_average):
        if patch_tokens is None:
            raise ValueError(f"{type(self.backbone).__name__} has no patch tokens to gather")
        n_chunks = patch_index.shape[0]
        dim = patch_tokens.shape[-1]
        tokens = patch_tokens.reshape(n_chunks, -1, dim)  # each chunk's images, image-major
        gathered = jnp.take_along_axis(tokens, patch_index[..., None], axis=1)
        head = self.head if self.patch_head is None else self.patch_head
        return head(gathered, use_running_average=use_running_average)

    def global_patch_tokens(self, group: jax.Array) -> jax.Array:
        """(n_global, B, N, D) final-norm patch tokens of the global group (B, n, H, W, C) in
        eval mode: what DINOv3's frozen Gram teacher gives (its params: a backbone's)."""
        batch, n = group.shape[:2]
        out = self.backbone(group.reshape(batch * n, *group.shape[2:]), train=False)
        tokens = out.patch_tokens.reshape(batch, n, *out.patch_tokens.shape[1:])
        return jnp.swapaxes(tokens, 0, 1)
