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
    return _mean_over_pairs(_pair_sums(student_logits, teacher_targets, student_temp), batch)


def _pair_sums(student_logits: jax.Array, teacher_targets: jax.Array, student_temp) -> jax.Array:
    """(T, S) matrix of batch-summed cross-entropies, one contraction over (batch, K)."""
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    return -jnp.einsum("tbk,sbk->ts", teacher_targets, log_p, precision=jax.lax.Precision.HIGHEST)


def _mean_over_pairs(cross: jax.Array, batch: int) -> jax.Array:
    """The mean over (teacher crop t, student crop s != t) pairs of `cross`'s batch sums."""
    n_teacher, n_student = cross.shape
    same_crop = jnp.arange(n_teacher)[:, None] == jnp.arange(n_student)[None, :]
    n_pairs = n_teacher * n_student - n_teacher
    return jnp.sum(jnp.where(same_crop, 0.0, cross)) / (batch * n_pairs)


def dino_cross_entropy_chunked(
    embeddings: jax.Array,
    prototypes: jax.Array,
    teacher_targets: jax.Array,
    *,
    student_temp: float,
    chunks: int,
    dtype=jnp.float32,
) -> jax.Array:
    """`dino_cross_entropy` of the student logits `embeddings @ prototypes`, made over
    `chunks` chunks of the batch so that the (S, B, K) float32 logits never exist at once.

    embeddings: (S, B, d), the student head's L2-normalised bottleneck (DINOHead.embed);
    prototypes: (d, K) float32, its last layer's weight (DINOHead.prototypes); the product is
    taken as the last layer takes it, operands in `dtype`, float32 accumulation. Each chunk's
    logits are made, reduced to its (T, S) cross-entropy sums and dropped; the backward pass
    makes them again, one chunk at a time (a rematerialised scan). The cost: one more
    last-layer matmul; the values differ from the unchunked ones only by float32 summation
    order.

    Chunk c holds images c, c + chunks, c + 2 chunks, ...: with the batch split over devices in
    equal contiguous blocks, each divisible by `chunks`, every device's chunk is a strided
    slice of its own images and nothing moves between devices.
    """
    n_student, batch, dim = embeddings.shape
    n_teacher = teacher_targets.shape[0]
    if n_teacher > n_student:
        raise ValueError(f"{n_teacher} teacher crops but only {n_student} student crops")
    if chunks < 1 or batch % chunks:
        raise ValueError(f"{chunks} chunks do not split a batch of {batch} into equal parts")
    rows = batch // chunks
    # (chunks, S, B / chunks, d): the embeddings are small; the targets stay where they are
    # and each chunk's are sliced out where they are used
    z = jnp.moveaxis(embeddings.reshape(n_student, rows, chunks, dim), 2, 0)
    targets = teacher_targets.reshape(n_teacher, rows, chunks, -1)

    @jax.checkpoint
    def add_chunk(total, chunk):
        index, z_chunk = chunk
        q = jax.lax.dynamic_index_in_dim(targets, index, axis=2, keepdims=False)
        logits = jnp.einsum(
            "sbd,dk->sbk",
            z_chunk.astype(dtype),
            prototypes.astype(dtype),  # cast per chunk: its gradient sums in float32
            preferred_element_type=jnp.float32,
        )
        return total + _pair_sums(logits, q, student_temp), None

    zeros = jnp.zeros((n_teacher, n_student), jnp.float32)
    cross, _ = jax.lax.scan(add_chunk, zeros, (jnp.arange(chunks), z))
    return _mean_over_pairs(cross, batch)


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
