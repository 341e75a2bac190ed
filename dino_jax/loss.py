"""The DINO objective and the teacher-output centering, as pure float32 functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def teacher_logits_centered(teacher_logits: jax.Array, center: jax.Array, temp) -> jax.Array:
    """(logits - center) / temp in float32: the teacher's sharpened, centred logits."""
    return (teacher_logits.astype(jnp.float32) - center.astype(jnp.float32)) / temp


def teacher_probs(teacher_logits: jax.Array, center: jax.Array, temp) -> jax.Array:
    """The teacher's targets: softmax((logits - center) / temp) over the prototypes."""
    return jax.nn.softmax(teacher_logits_centered(teacher_logits, center, temp), axis=-1)


def dino_cross_entropy(
    student_logits: jax.Array, teacher_targets: jax.Array, *, student_temp: float
) -> jax.Array:
    """Cross-entropy between teacher targets and student crop distributions, averaged over pairs.

    student_logits: (S, B, K) crop-major, the first T crops being the teacher's global crops;
    teacher_targets: (T, B, K) distributions (whatever centred them). Every (teacher crop t,
    student crop s != t) pair contributes the batch mean of sum_k -q_t log p_s; the result is
    the mean over the S*T - T pairs (the official DINO normalisation). Computed in float32.
    """
    n_student, batch, _ = student_logits.shape
    n_teacher = teacher_targets.shape[0]
    if n_teacher > n_student:
        raise ValueError(f"{n_teacher} teacher crops but only {n_student} student crops")
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    # (T, S) matrix of batch-summed cross-entropies, one contraction over (batch, K).
    cross = -jnp.einsum("tbk,sbk->ts", teacher_targets, log_p, precision=jax.lax.Precision.HIGHEST)
    same_crop = jnp.arange(n_teacher)[:, None] == jnp.arange(n_student)[None, :]
    n_pairs = n_teacher * n_student - n_teacher
    return jnp.sum(jnp.where(same_crop, 0.0, cross)) / (batch * n_pairs)


def dino_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    center: jax.Array,
    *,
    student_temp: float,
    teacher_temp: float | jax.Array,
) -> jax.Array:
    """The official DINOLoss: `dino_cross_entropy` against the teacher's softmax of its
    centred logits. teacher_logits: (T, B, K); center: (1, K). At teacher temperature 0.04 a
    bfloat16 softmax is not safe: everything here is float32."""
    q = jax.lax.stop_gradient(teacher_probs(teacher_logits, center, teacher_temp))
    return dino_cross_entropy(student_logits, q, student_temp=student_temp)


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum: float) -> jax.Array:
    """EMA of the teacher's mean output over all its crops and the whole (global) batch.

    Called after the loss, as the official DINOLoss does; under jit a mean over a sharded
    batch is already the cross-device mean.
    """
    batch_center = jnp.mean(teacher_logits.astype(jnp.float32), axis=(0, 1))[None, :]
    return center * momentum + batch_center * (1.0 - momentum)
