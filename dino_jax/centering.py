"""DINOv2's Sinkhorn-Knopp teacher targets and its DINO loss terms (the EMA softmax centering,
which DINOv2 keeps as its "centering" choice, is dino_jax.loss's teacher_probs / update_center:
DINOv2 stages the center update to the next step, which gives the same center at every step;
its saved `center` buffer is one update behind ours). dino_jax.objective.teacher_targets picks
one by `dino.centering`.

Shapes follow dino_jax.loss: teacher logits and targets are (..., K), crop-major (T, B, K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sinkhorn_knopp(
    teacher_logits: jax.Array,
    temp: float | jax.Array,
    n_iterations: int = 3,
    *,
    num_samples: int | jax.Array | None = None,
) -> jax.Array:
    """Teacher targets by a few Sinkhorn-Knopp steps, as dinov2/loss/dino_clstoken_loss.py's
    DINOLoss.sinkhorn_knopp_teacher (SwAV's balanced assignment; DINOv2's "sinkhorn_knopp").

    teacher_logits: (..., K); every leading position is one sample (row). Returns (..., K)
    float32 targets: each row sums to 1, each prototype gets about 1/K of the mass (exactly
    only in the limit of many iterations).

    All sums over samples run over the whole array, i.e. over the GLOBAL batch when it is
    sharded under jit: that is what the official all_reduce of the total and of the prototype
    sums gives; the per-sample sums are local in both. `num_samples` is the official `B`
    (rows times world size); it defaults to the number of rows of the (global) array. iBOT's
    variant passes its masked-token count instead.

    No max is subtracted before exp, as in the official code, so values match it to rounding:
    the logits must stay bounded, |logit / temp| < ~80 in float32. DINOHead's L2-normalised
    bottleneck and unit-norm prototypes give |logit| <= 1, i.e. 25 at temperature 0.04.
    The teacher is not differentiated; callers stop gradients as with teacher_probs.
    """
    q = jnp.exp(teacher_logits.astype(jnp.float32) / temp)  # (..., K): official Q.T
    n_prototypes = q.shape[-1]
    samples = tuple(range(q.ndim - 1))  # no reshape: keeps a sharded batch axis in place
    if num_samples is None:
        num_samples = q.size // n_prototypes
    q = q / jnp.sum(q)
    for _ in range(n_iterations):
        # each prototype's total weight 1/K (official rows; all-reduced there, global here)
        q = q / jnp.sum(q, axis=samples, keepdims=True) / n_prototypes
        # each sample's total weight 1/B (official columns; per sample, local in both)
        q = q / jnp.sum(q, axis=-1, keepdims=True) / num_samples
    return q * num_samples  # rows sum to 1: an assignment per sample


def dinov2_cross_entropy_sum(
    student_logits: jax.Array, teacher_targets: jax.Array, student_temp: float = 0.1
) -> jax.Array:
    """DINOv2's DINOLoss.forward: the UNNORMALISED sum over every (student, teacher) pair.

    student_logits: (S, N, K), one entry per element of the official student_output_list;
    teacher_targets: (T, N, K), the official teacher list. Returns
    sum_{s, t} mean_n -sum_k t log_softmax(s / student_temp): no division by the number of
    pairs and no exclusion of s == t. The caller normalises (dinov2_dino_terms does it as
    ssl_meta_arch.py does).
    """
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    q = jax.lax.stop_gradient(teacher_targets.astype(jnp.float32))
    cross = jnp.einsum("tnk,snk->", q, log_p, precision=jax.lax.Precision.HIGHEST)
    return -cross / student_logits.shape[1]


def dinov2_dino_terms(
    student_logits: jax.Array, teacher_targets: jax.Array, student_temp: float = 0.1
) -> tuple[jax.Array, jax.Array]:
    """(global, local) DINO loss terms of dinov2/train/ssl_meta_arch.py, normalised as there.

    student_logits: (n_global + n_local, B, K) crop-major, global crops first;
    teacher_targets: (n_global, B, K) in crop order, NOT swapped: ssl_meta_arch swaps the two
    teacher crops so that its one "global" pair over 2B rows matches crop A with crop B; here
    that pair is written as the pairs s != t directly. Both terms are divided by
    n_terms = n_global * (n_global - 1) + max(n_global * n_local, 1); with local crops their
    sum equals dino_jax.loss.dino_loss (the mean over pairs s != t) for the same teacher
    targets. With none the local term is 0 (the official code skips it) and n_terms keeps
    its official 1 for the missing local pairs.
    """
    n_global = teacher_targets.shape[0]
    n_local = student_logits.shape[0] - n_global
    n_terms = n_global * (n_global - 1) + max(n_global * n_local, 1)
    local = dinov2_cross_entropy_sum(student_logits[n_global:], teacher_targets, student_temp)
    log_p = jax.nn.log_softmax(student_logits[:n_global].astype(jnp.float32) / student_temp, -1)
    q = jax.lax.stop_gradient(teacher_targets.astype(jnp.float32))
    cross = -jnp.einsum("tbk,sbk->ts", q, log_p, precision=jax.lax.Precision.HIGHEST)
    cross_view = jnp.sum(cross) - jnp.trace(cross)  # pairs s != t only
    return cross_view / (student_logits.shape[1] * n_terms), local / n_terms
