"""DINOv3's Gram anchoring loss: patch-similarity structure of the student pulled towards that
of a frozen earlier teacher (Simeoni et al. 2025, dinov3/loss/gram_loss.py's GramLoss)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) on the last axis, as torch.nn.functional.normalize."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def gram_loss(
    student: jax.Array,
    teacher: jax.Array,
    *,
    img_level: bool,
    apply_norm: bool = True,
    remove_neg: bool = False,
    remove_only_teacher_neg: bool = False,
    group_size: int | None = None,
    token_mask: jax.Array | None = None,
) -> jax.Array:
    """Mean squared difference between the student's and the teacher's patch Gram matrices.

    student, teacher: (..., N, D) patch features (the leading axes are images, in any order),
    or (R, D) already-selected tokens with `img_level=False`. Computed in float32; the teacher
    gets no gradient (the official gram teacher runs under no_grad).

    img_level: one (N, N) Gram per image, the loss is the mean over every entry of every
      image (the 7B gram-anchoring recipe). Otherwise one Gram over all tokens of a group
      of images, cross-image pairs included (ssl_default and the distilled ViT-L recipe).
    apply_norm: L2-normalise each token first, so entries are cosine similarities.
    remove_neg: clamp negative entries of both Grams to 0 (the official constructor's
      default, but every official recipe sets False, as here).
    remove_only_teacher_neg: clamp only the teacher's negatives. The official code then also
      zeroes student entries where both are negative, but tests the already-clamped teacher,
      so that never happens; the same here.
    group_size: with img_level=False, images (entries of the flattened leading axes) per
      Gram; the loss is the mean over the groups. The official computes this Gram on each
      GPU's own batch and averages over GPUs, so `group_size` = official images per GPU
      (both global crops of each image: 2 * batch_size_per_gpu rows of the backbone's
      image-major output) reproduces its objective on any number of devices. None: one Gram
      over the whole batch. With img_level=True the loss is the same per image whatever the
      split, so the official per-GPU means average to this global mean.
    token_mask: (..., N) bool, with img_level=False: only the selected tokens enter the
      Gram (the official `gram.tokens_used` "masked" / "unmasked", student[masks]); each
      group's mean is over its selected pairs.
    """
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("remove_neg and remove_only_teacher_neg exclude each other")
    if student.shape != teacher.shape:
        raise ValueError(f"student {student.shape} and teacher {teacher.shape} differ")
    if img_level and (student.ndim < 3 or token_mask is not None or group_size is not None):
        raise ValueError("img_level=True takes (..., N, D) features, no token_mask or group_size")
    if token_mask is not None and token_mask.shape != student.shape[:-1]:
        raise ValueError(f"token_mask {token_mask.shape} is not {student.shape[:-1]}")
    s = student.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher).astype(jnp.float32)
    if apply_norm:
        s, t = l2_normalize(s), l2_normalize(t)

    if img_level:
        s = s.reshape(-1, *s.shape[-2:])  # (images, N, D)
        t = t.reshape(-1, *t.shape[-2:])
        weights = None
    else:
        s, t, weights = _groups(s, t, group_size, token_mask)  # (groups, rows, D)

    s_sim = jnp.einsum("gnd,gmd->gnm", s, s, precision=_HIGHEST)
    t_sim = jnp.einsum("gnd,gmd->gnm", t, t, precision=_HIGHEST)
    if remove_neg:
        s_sim, t_sim = jnp.maximum(s_sim, 0.0), jnp.maximum(t_sim, 0.0)
    elif remove_only_teacher_neg:
        t_sim = jnp.maximum(t_sim, 0.0)
    sq = jnp.square(s_sim - t_sim)
    if weights is None:
        return jnp.mean(sq)
    pair = weights[:, :, None] * weights[:, None, :]
    per_group = jnp.sum(sq * pair, axis=(1, 2)) / jnp.maximum(jnp.sum(pair, axis=(1, 2)), 1.0)
    return jnp.mean(per_group)


def _groups(s, t, group_size, token_mask):
    """(groups, rows, D) student / teacher tokens of the batch-level Grams, and the
    (groups, rows) float weights of the selected tokens (None: all tokens)."""
    if s.ndim == 2:
        if group_size is not None or token_mask is not None:
            raise ValueError("(R, D) tokens form one Gram: no group_size or token_mask")
        return s[None], t[None], None
    n, d = s.shape[-2:]
    s, t = s.reshape(-1, n, d), t.reshape(-1, n, d)  # (images, N, D)
    images = s.shape[0]
    size = images if group_size is None else group_size
    if size <= 0 or images % size:
        raise ValueError(f"group_size={group_size} does not divide the {images} images")
    groups = images // size
    weights = None
    if token_mask is not None:
        weights = token_mask.reshape(groups, size * n).astype(jnp.float32)
    return s.reshape(groups, size * n, d), t.reshape(groups, size * n, d), weights
