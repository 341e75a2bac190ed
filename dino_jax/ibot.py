"""DINOv2's iBOT masked-patch objective (dinov2/loss/ibot_patch_loss.py's iBOTPatchLoss) as pure
float32 functions, and the student's mask-token substitution.

Every function takes patch arrays of any leading shape (..., K) with a matching (...) weight or
validity array, so one code path serves both layouts a step can use:
  * dense: all patch tokens, (n_images, N, K) with the (n_images, N) bool masks (or any
    batch-first arrangement such as (B, n_global_crops, N, K));
  * flat: a static buffer of gathered masked tokens, (capacity, K), padded rows weight 0
    (dino_jax.data.masking.CollatedMasks.padded gives the indices and weights).
Sums run over all leading axes: under jit on a sharded batch they are the global sums the
official code all-reduces, so the result does not depend on the number of devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def apply_mask_token(tokens: jax.Array, masks: jax.Array, mask_token: jax.Array) -> jax.Array:
    """Masked patch tokens replaced by the learned token, as DinoVisionTransformer's
    prepare_tokens_with_masks does after the patch embedding and before the position embedding.

    tokens: (B, N, D) patch embeddings; masks: (B, N) bool; mask_token: (D,) or (1, D),
    cast to the tokens' dtype as the official code does.
    """
    mask_token = mask_token.reshape(-1).astype(tokens.dtype)
    return jnp.where(masks[..., None], mask_token, tokens)


def masks_weight(masks: jax.Array) -> jax.Array:
    """(..., N) bool -> (..., N) float32: 1 / (masked tokens of the image) on its masked tokens,
    0 elsewhere: the collate's `masks_weight` in the dense layout (an unmasked image has 0s)."""
    masks = masks.astype(jnp.float32)
    return masks / jnp.maximum(jnp.sum(masks, axis=-1, keepdims=True), 1.0)


def ibot_patch_loss(
    student_logits: jax.Array,
    teacher_targets: jax.Array,
    weights: jax.Array,
    n_images,
    *,
    student_temp: float = 0.1,
) -> jax.Array:
    """-sum_tokens weights * sum_k q log softmax(s / student_temp) / n_images (forward_masked).

    student_logits, teacher_targets: (..., K) (targets are distributions: centred softmax or
    Sinkhorn-Knopp); weights: (...) float, `masks_weight` per masked token, 0 on unmasked or
    padding tokens; n_images: the number of global-crop images of the whole batch, masked or
    not (official `student_masks_flat.shape[0]`). Tokens of weight 0 contribute exactly 0,
    whatever their logits.
    """
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    per_token = jnp.sum(teacher_targets.astype(jnp.float32) * log_p, axis=-1)
    weights = weights.astype(jnp.float32)
    per_token = jnp.where(weights != 0, per_token * weights, 0.0)
    return -jnp.sum(per_token) / n_images


def ibot_patch_loss_dense(
    student_logits: jax.Array,
    teacher_targets: jax.Array,
    masks: jax.Array,
    *,
    student_temp: float = 0.1,
) -> jax.Array:
    """iBOTPatchLoss.forward: (n_images, N, K) logits and targets, (n_images, N) bool masks;
    the per-image mean over its masked tokens, averaged over all images. Equal to
    `ibot_patch_loss` with `masks_weight(masks)` and n_images = masks.shape[0]."""
    n_images = masks.size // masks.shape[-1]
    return ibot_patch_loss(
        student_logits, teacher_targets, masks_weight(masks), n_images, student_temp=student_temp
    )


def softmax_center_teacher(teacher_logits: jax.Array, center: jax.Array, temp) -> jax.Array:
    """softmax((t - center) / temp) over the K prototypes, float32. center: (1, K) (the
    official (1, 1, K) buffer), the one staged by the previous step's update_patch_center."""
    t = teacher_logits.astype(jnp.float32) - center.astype(jnp.float32).reshape(-1)
    return jax.nn.softmax(t / temp, axis=-1)


def update_patch_center(
    center: jax.Array, teacher_logits: jax.Array, valid: jax.Array, momentum: float = 0.9
) -> jax.Array:
    """EMA of the mean teacher logit over the masked tokens of the batch (update_center then
    apply_center_update), applied after the loss as the official code does.

    teacher_logits: (..., K); valid: (...) bool or float, nonzero on masked tokens. The mean
    is over the masked tokens of the whole (global) batch; the official code averages each
    GPU's masked-token mean over GPUs, which is the same when GPUs hold equally many masked
    tokens. With no masked token the center stays as it is (the official mean would be NaN).
    """
    valid = (valid != 0).astype(jnp.float32)
    t = teacher_logits.astype(jnp.float32).reshape(-1, teacher_logits.shape[-1])
    v = valid.reshape(-1)
    count = jnp.sum(v)
    batch_center = jnp.einsum("n,nk->k", v, t, precision=_HI) / jnp.maximum(count, 1.0)
    new = center * momentum + batch_center.reshape(center.shape) * (1.0 - momentum)
    return jnp.where(count > 0, new, center)


def update_patch_center_per_chunk(
    center: jax.Array, teacher_logits: jax.Array, valid: jax.Array, momentum: float = 0.9
) -> jax.Array:
    """update_patch_center with the official reduction: teacher_logits (n_chunks, tokens, K),
    valid (n_chunks, tokens); each chunk's (an official GPU's) mean over its masked tokens,
    averaged over the chunks that have any. With one chunk this is update_patch_center."""
    valid = (valid != 0).astype(jnp.float32)
    counts = jnp.sum(valid, axis=1)  # (n_chunks,)
    sums = jnp.einsum("cn,cnk->ck", valid, teacher_logits.astype(jnp.float32), precision=_HI)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    present = (counts > 0).astype(jnp.float32)
    n_present = jnp.sum(present)
    batch_center = jnp.einsum("c,ck->k", present, means, precision=_HI) / jnp.maximum(n_present, 1)
    new = center * momentum + batch_center.reshape(center.shape) * (1.0 - momentum)
    return jnp.where(n_present > 0, new, center)


def sinkhorn_knopp_teacher(
    teacher_logits: jax.Array, temp, valid: jax.Array, n_iterations: int = 3
) -> jax.Array:
    """Sinkhorn-Knopp targets over the masked tokens (iBOTPatchLoss.sinkhorn_knopp_teacher).

    teacher_logits: (..., K), bounded (no max is subtracted before exp, as officially);
    valid: (...) nonzero on the masked tokens. The token mass and the prototype marginals
    are sums over all masked tokens of the batch (all-reduced officially); each token's
    normalisation is its own. Returns (..., K) float32, rows of masked tokens summing to 1,
    zeros elsewhere. The official division by B (the global masked-token count) before the
    final multiplication by B cancels exactly; it is kept for float32 parity.
    """
    shape = teacher_logits.shape
    v = (valid != 0).reshape(-1, 1)
    n_prototypes = shape[-1]
    n_tokens = jnp.sum(v.astype(jnp.float32))
    q = jnp.where(
        v, jnp.exp(teacher_logits.astype(jnp.float32).reshape(-1, n_prototypes) / temp), 0.0
    )
    q = _safe_div(q, jnp.sum(q))
    for _ in range(n_iterations):
        q = _safe_div(q, jnp.sum(q, axis=0, keepdims=True))  # each prototype's total mass ...
        q = q / n_prototypes  # ... becomes 1 / K
        q = _safe_div(q, jnp.sum(q, axis=1, keepdims=True))  # each token's becomes 1 / B
        q = _safe_div(q, n_tokens)
    return (q * n_tokens).reshape(shape)


def _safe_div(x: jax.Array, d: jax.Array) -> jax.Array:
    # x / d where d > 0, else 0: padding rows and a batch without masked tokens give zeros,
    # not NaNs that a weight of 0 would not stop in the gradient.
    return jnp.where(d > 0, x / jnp.where(d > 0, d, 1.0), 0.0)
