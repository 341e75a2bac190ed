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
plus DINOv2's KoLeo regulariser with its weight.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from dino_jax.loss import dino_cross_entropy, teacher_probs


@struct.dataclass
class StepOutputs:
    """One step's network outputs, crop-major (global crops first), float32 logits."""

    student_logits: jax.Array  # (n_crops, B, K): the student head on every crop
    teacher_logits: jax.Array  # (n_global, B, K): the teacher head on the global crops
    student_features: jax.Array  # (n_crops, B, D): the student backbone's features
    teacher_features: jax.Array  # (n_global, B, D)
    center: jax.Array  # (1, K): the EMA center before this step moves it
    teacher_temp: jax.Array  # this step's teacher temperature
    step: jax.Array  # int32: updates done before this one


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


def dino_objective(student_temp: float = 0.1, centering: str = "ema") -> Objective:
    """DINO's loss: the mean over (teacher crop, other student crop) pairs of the batch-mean
    cross-entropy between the teacher's targets and the student's softmax at `student_temp`."""
    if centering not in CENTERINGS:
        raise ValueError(f"centering={centering!r}: use one of {CENTERINGS}")

    def objective(out: StepOutputs):
        q = jax.lax.stop_gradient(teacher_targets(out, centering))
        loss = dino_cross_entropy(out.student_logits, q, student_temp=student_temp)
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
