"""The pure DINO update, and the compiled training step built on it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from dino_jax.data.augment import MultiCropConfig, multicrop
from dino_jax.loss import teacher_logits_centered, teacher_probs, update_center
from dino_jax.models.multicrop import MultiCropNetwork
from dino_jax.objective import Objective, StepOutputs, check_objective_result, dino_objective
from dino_jax.schedules import Schedules
from dino_jax.state import TrainState, ema, variables


@dataclasses.dataclass(frozen=True)
class DinoHParams:
    """Static parts of the update: the network, the optimiser, the schedules, the objective
    (dino_jax.objective: official DINO by default) and the center's momentum."""

    model: MultiCropNetwork
    tx: optax.GradientTransformationExtraArgs
    schedules: Schedules
    objective: Objective = dataclasses.field(default_factory=dino_objective)
    center_momentum: float = 0.9


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def collapse_metrics(teacher_logits: jax.Array, center: jax.Array, temp: jax.Array) -> dict:
    """Teacher entropy (against ln K), KL(mean teacher distribution || uniform), center norm.

    Collapse to one prototype drives the entropy to 0; collapse to uniform drives it to ln K
    and the KL to 0.
    """
    k = teacher_logits.shape[-1]
    # the loss's own expression, so that XLA computes the softmax once for both
    q = teacher_probs(teacher_logits, center, temp)
    log_q = jax.nn.log_softmax(teacher_logits_centered(teacher_logits, center, temp), axis=-1)
    entropy = -jnp.sum(q * log_q, axis=-1).mean()
    mean_q = q.reshape(-1, k).mean(0)
    kl_uniform = jnp.sum(mean_q * jnp.log(jnp.maximum(mean_q, 1e-30))) + jnp.log(k)
    return {
        "collapse/teacher_entropy": entropy,
        "collapse/entropy_max": jnp.log(jnp.float32(k)),
        "collapse/kl_uniform": kl_uniform,
        "collapse/center_norm": jnp.linalg.norm(center),
    }


def dino_update(
    state: TrainState, crops: Sequence[jax.Array], key: jax.Array, hp: DinoHParams
) -> tuple[TrainState, dict]:
    """One official training iteration on already-augmented crops.

    crops: groups of equal resolution, (B, n, H, W, C) each, the 2 global crops first.
    Order as train_one_epoch: teacher forward on the global crops, student forward on all,
    loss, gradient, per-tensor clip, the optimiser step (last layer skipped while frozen),
    teacher EMA of the parameters; the center moves after the loss, from the teacher logits
    of this batch. BatchNorm running statistics move with each network's own forward passes.
    """
    sch = hp.schedules
    step = state.step
    teacher_temp = sch.teacher_temp_at(step)
    # Both networks normalise with batch statistics and update their own running ones.
    (t_logits, t_feats), t_stats = hp.model.apply(
        variables(state.teacher, state.teacher_stats),
        crops[:1],
        use_running_average=False,
        return_features=True,
        mutable=["batch_stats"],
    )  # (2, B, K), (2, B, D)
    t_logits, t_feats = jax.lax.stop_gradient((t_logits, t_feats))

    def loss_fn(student):
        (s_logits, s_feats), s_stats = hp.model.apply(
            variables(student, state.student_stats),
            crops,
            train=True,
            use_running_average=False,
            return_features=True,
            mutable=["batch_stats"],
            rngs={"drop_path": key},
        )  # (n_crops, B, K), (n_crops, B, D)
        outputs = StepOutputs(
            student_logits=s_logits,
            teacher_logits=t_logits,
            student_features=s_feats,
            teacher_features=t_feats,
            center=state.center,
            teacher_temp=teacher_temp,
            step=step,
        )
        loss, terms = check_objective_result(hp.objective(outputs))
        return loss, (s_stats, terms)

    (loss, (s_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)
    updates, opt_state = hp.tx.update(grads, state.opt_state, state.student, step=step)
    student = optax.apply_updates(state.student, updates)
    momentum = sch.momentum(step)
    new_state = state.replace(
        step=step + 1,
        student=student,
        teacher=ema(state.teacher, student, momentum),
        opt_state=opt_state,
        center=update_center(state.center, t_logits, hp.center_momentum),
        student_stats=dict(s_stats.get("batch_stats", {})),
        teacher_stats=dict(t_stats.get("batch_stats", {})),
    )
    metrics = {
        **terms,
        "train/loss": loss,
        "train/lr": sch.lr(step),
        "train/wd": sch.wd(step),
        "train/momentum": momentum,
        "train/teacher_temp": teacher_temp,
        "train/grad_norm": global_norm(grads),
        **collapse_metrics(t_logits, state.center, teacher_temp),
    }
    return new_state, metrics


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    base_key: jax.Array,
    *,
    hp: DinoHParams,
    aug: MultiCropConfig,
    compute_dtype=jnp.bfloat16,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict]:
    """Augment a batch of host canvases on the device, then one DINO update.

    Randomness is a pure function of (seed, step, example): the step's key is folded from the
    base key, and example i of the global batch gets the i-th split of it, so a resumed run
    sees exactly the crops of an uninterrupted one. With `skip_nonfinite`, a step whose loss
    or gradient is not finite leaves the state unchanged (but for the step count).
    """
    aug_key, drop_key = jax.random.split(jax.random.fold_in(base_key, state.step))
    keys = jax.random.split(aug_key, batch["image"].shape[0])
    global_crops, local_crops = multicrop(
        keys, batch["image"], batch["size"], aug, dtype=compute_dtype
    )
    crops = (global_crops, local_crops) if aug.n_local else (global_crops,)
    new_state, metrics = dino_update(state, crops, drop_key, hp)
    if skip_nonfinite:
        ok = jnp.isfinite(metrics["train/loss"]) & jnp.isfinite(metrics["train/grad_norm"])
        kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        new_state = kept.replace(step=new_state.step)
        metrics["train/skipped"] = (~ok).astype(jnp.float32)
    return new_state, metrics
