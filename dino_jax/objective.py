"""The training objective as a plain function: what the networks produced in one step goes in,
the loss to minimise (and metrics to log) comes out.

`dino_update` calls `objective(outputs)` inside the student's gradient: everything in
`StepOutputs` that comes from the student carries gradient, the teacher's does not. An
objective is any function with this signature, so a research variant needs no change to
dino_jax:

    def my_objective(out: StepOutputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        loss, metrics = dino_objective()(out)
        spread = jnp.var(out.student_features, axis=1).mean()  # e.g. a variance term
        return loss - 0.01 * spread, {**metrics, "train/spread": spread}

    train(config, workdir, objective=my_objective)

The built-in objectives are built from config (`objective_from_config`): DINO's cross-entropy
with the teacher centred by its EMA center (the official DINO) or by Sinkhorn-Knopp (DINOv2),
plus, each with its weight, DINOv2's KoLeo regulariser, iBOT's masked-patch loss and DINOv3's
Gram anchoring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from dino_jax.loss import dino_cross_entropy, dino_cross_entropy_chunked, teacher_probs


@struct.dataclass
class StepOutputs:
    """One step's network outputs, crop-major (global crops first), float32 logits."""

    # (n_crops, B, K): the student head on every crop; None with dino.loss_chunks, where the
    # loss makes them from student_embeddings and student_prototypes (student_cross_entropy)
    student_logits: jax.Array | None
    teacher_logits: jax.Array  # (n_global, B, K): the teacher head on the global crops
    student_features: jax.Array  # (n_crops, B, D): the student backbone's features
    teacher_features: jax.Array  # (n_global, B, D)
    center: jax.Array  # (1, K): the EMA center before this step moves it
    teacher_temp: jax.Array  # this step's teacher temperature
    step: jax.Array  # int32: updates done before this one
    # ViT backbones: the global crops' final-norm patch tokens, (n_global, B, N, D); the
    # student's come from its masked input when iBOT is on. None for a ResNet.
    student_patch_tokens: jax.Array | None = None
    teacher_patch_tokens: jax.Array | None = None
    # iBOT (dino.ibot_weight > 0), else None: the masks of the global crops (n_global, B, N)
    # bool; the patch head's logits on the gathered masked tokens, (n_chunks, capacity, K_p),
    # student's and teacher's; their weights (n_chunks, capacity): the collate's masks_weight,
    # 0 on padding slots; and the patch center before this step moves it, (1, K_p).
    patch_masks: jax.Array | None = None
    student_patch_logits: jax.Array | None = None
    teacher_patch_logits: jax.Array | None = None
    patch_weights: jax.Array | None = None
    patch_center: jax.Array | None = None
    # Gram anchoring (dino.gram_weight > 0), else None: the frozen Gram teacher's patch
    # tokens of the global crops, (n_global, B, N, D)
    gram_patch_tokens: jax.Array | None = None
    # dino.loss_chunks > 0, else None: the student head's L2-normalised bottleneck of every
    # crop (n_crops, B, d) and its float32 prototypes (d, K); the last layer's compute dtype
    # and the number of batch chunks its logits are made in
    student_embeddings: jax.Array | None = None
    student_prototypes: jax.Array | None = None
    logits_dtype: Any = struct.field(pytree_node=False, default=jnp.float32)
    logits_chunks: int = struct.field(pytree_node=False, default=0)


Objective = Callable[[StepOutputs], tuple[jax.Array, dict[str, jax.Array]]]
CENTERINGS = ("ema", "sinkhorn")


def teacher_targets(out: StepOutputs, centering: str = "ema") -> jax.Array:
    """The teacher's distributions: softmax of its EMA-centred logits (DINO), or the
    Sinkhorn-Knopp normalisation of its logits over the global batch (DINOv2, 3 iterations)."""
    if centering == "ema":
        return teacher_probs(out.teacher_logits, out.center, out.teacher_temp)
    if centering == "sinkhorn":
        from dino_jax.centering import sinkhorn_knopp

        return sinkhorn_knopp(out.teacher_logits, out.teacher_temp)
    raise ValueError(f"centering={centering!r}: use one of {CENTERINGS}")


def student_cross_entropy(out: StepOutputs, targets: jax.Array, student_temp: float) -> jax.Array:
    """DINO's cross-entropy of the student's crops against `targets` (T, B, K): from its
    logits, or, with dino.loss_chunks, made chunk by chunk from its bottleneck and prototypes
    (dino_jax.loss.dino_cross_entropy_chunked), the same value."""
    if out.student_logits is not None:
        return dino_cross_entropy(out.student_logits, targets, student_temp=student_temp)
    return dino_cross_entropy_chunked(
        out.student_embeddings,
        out.student_prototypes,
        targets,
        student_temp=student_temp,
        chunks=out.logits_chunks,
        dtype=out.logits_dtype,
    )


def dino_objective(student_temp: float = 0.1, centering: str = "ema") -> Objective:
    """DINO's loss: the mean over (teacher crop, other student crop) pairs of the batch-mean
    cross-entropy between the teacher's targets and the student's softmax at `student_temp`."""
    if centering not in CENTERINGS:
        raise ValueError(f"centering={centering!r}: use one of {CENTERINGS}")

    def objective(out: StepOutputs):
        q = jax.lax.stop_gradient(teacher_targets(out, centering))
        loss = student_cross_entropy(out, q, student_temp)
        return loss, {"train/dino_loss": loss}

    return objective


def koleo_term(num_chunks: int = 1):
    """DINOv2's KoLeo regulariser on the student's global-crop features (the backbone's CLS,
    before the head), summed over the global crops, each crop's batch on its own, as
    dinov2/train/ssl_meta_arch.py does. The official code computes it per GPU: `num_chunks`
    equal consecutive chunks of the global batch reproduce that (set it to the official world
    size); 1 searches neighbours over the whole global batch, across devices."""
    from dino_jax.koleo import dinov2_koleo_term

    def term(out: StepOutputs) -> jax.Array:
        n_global = out.teacher_logits.shape[0]
        return dinov2_koleo_term(out.student_features[:n_global], weight=1.0, num_chunks=num_chunks)

    return term


def patch_targets(out: StepOutputs, centering: str = "ema") -> jax.Array:
    """The teacher's targets for the masked patches: softmax around the patch center, or
    Sinkhorn-Knopp over every masked token of the batch (padding slots get zeros)."""
    from dino_jax import ibot

    if centering == "ema":
        return ibot.softmax_center_teacher(
            out.teacher_patch_logits, out.patch_center, out.teacher_temp
        )
    valid = out.patch_weights != 0
    return ibot.sinkhorn_knopp_teacher(out.teacher_patch_logits, out.teacher_temp, valid)


def ibot_term(student_temp: float = 0.1, centering: str = "ema"):
    """iBOT's masked-patch cross-entropy (DINOv2's iBOTPatchLoss.forward_masked): for each
    masked token of a global crop, the teacher's target against the student's softmax, each
    crop's tokens weighted 1 / (its masked count), summed and divided by the number of
    global-crop images of the batch (masked or not). DINOv2 scales it by 2 / n_global = 1."""
    from dino_jax.ibot import ibot_patch_loss

    def term(out: StepOutputs) -> jax.Array:
        q = jax.lax.stop_gradient(patch_targets(out, centering))
        n_images = out.teacher_logits.shape[0] * out.teacher_logits.shape[1]
        return ibot_patch_loss(
            out.student_patch_logits, q, out.patch_weights, n_images, student_temp=student_temp
        )

    return term


def gram_term(
    *,
    start_step: int = 0,
    img_level: bool = False,
    tokens: str = "all",
    remove_neg: bool = False,
    remove_only_teacher_neg: bool = False,
    chunks: int = 1,
):
    """DINOv3's Gram anchoring (dinov3/loss/gram_loss.py) between the student's and the
    frozen Gram teacher's normalised patch tokens of the global crops; 0 before
    `start_step`. Batch-level Grams (img_level False) are over `chunks` equal chunks of the
    images, both global crops of each image together (the official: per GPU); `tokens`
    "masked" / "unmasked" keeps only the iBOT-masked / unmasked patches in them."""
    from dino_jax.gram import gram_loss

    def term(out: StepOutputs) -> jax.Array:
        # image-major, so a chunk of rows holds whole images with both crops
        student = jnp.swapaxes(out.student_patch_tokens, 0, 1)  # (B, n_global, N, D)
        teacher = jnp.swapaxes(out.gram_patch_tokens, 0, 1)
        selected = None
        if tokens != "all":
            masks = jnp.swapaxes(out.patch_masks, 0, 1)
            selected = masks if tokens == "masked" else ~masks
        group = None if img_level else student.shape[0] * student.shape[1] // chunks
        value = gram_loss(
            student,
            teacher,
            img_level=img_level,
            remove_neg=remove_neg,
            remove_only_teacher_neg=remove_only_teacher_neg,
            group_size=group,
            token_mask=selected,
        )
        return jnp.where(out.step >= start_step, value, 0.0)

    return term


def with_term(objective: Objective, term, weight: float, name: str) -> Objective:
    """`objective` plus `weight * term(outputs)`, the term logged as `name`."""

    def combined(out: StepOutputs):
        loss, metrics = objective(out)
        value = term(out)
        return loss + weight * value, {**metrics, name: value}

    return combined


def objective_from_config(d) -> Objective:
    """The objective of a `config.dino` section."""
    objective = dino_objective(d.student_temp, d.centering)
    if d.koleo_weight:
        objective = with_term(objective, koleo_term(d.koleo_chunks), d.koleo_weight, "train/koleo")
    if d.ibot_weight:
        ibot = ibot_term(d.student_temp, d.centering)
        objective = with_term(objective, ibot, d.ibot_weight, "train/ibot")
    if d.gram_weight:
        gram = gram_term(
            start_step=d.gram_start_step,
            img_level=d.gram_img_level,
            tokens=d.gram_tokens,
            remove_neg=d.gram_remove_neg,
            remove_only_teacher_neg=d.gram_remove_only_teacher_neg,
            chunks=d.gram_chunks,
        )
        objective = with_term(objective, gram, d.gram_weight, "train/gram")
    return objective


def check_objective_result(result) -> tuple[jax.Array, dict]:
    """An objective's (loss, metrics), checked where it is traced: a scalar loss and a dict."""
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
        raise TypeError(
            "an objective returns (loss, metrics): a scalar and a dict of scalars, got"
            f" {type(result).__name__}"
        )
    loss, metrics = result
    if jnp.shape(loss) != ():
        raise TypeError(f"an objective's loss must be a scalar, got shape {jnp.shape(loss)}")
    return loss, metrics
