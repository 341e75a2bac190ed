"""The pure DINO update, and the compiled training step built on it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from dino_jax.data.augment import MultiCropConfig, multicrop
from dino_jax.ibot import update_patch_center_per_chunk
from dino_jax.loss import teacher_logits_centered, teacher_probs, update_center
from dino_jax.models.multicrop import MultiCropNetwork
from dino_jax.objective import Objective, StepOutputs, check_objective_result, dino_objective
from dino_jax.optim_flat import FlatOptimizer, as_tree
from dino_jax.schedules import Schedules
from dino_jax.state import TrainState, ema, variables


@dataclasses.dataclass(frozen=True)
class GramRefresh:
    """When DINOv3's frozen Gram teacher is (re)taken from the EMA teacher: at `start_step`,
    then every `every` steps (0: never again)."""

    start_step: int = 0
    every: int = 0

    def due(self, step: jax.Array) -> jax.Array:
        due = step == self.start_step
        if self.every:
            later = step - self.start_step
            due = due | ((later > 0) & (later % self.every == 0))
        return due


@dataclasses.dataclass(frozen=True)
class DinoHParams:
    """Static parts of the update: the network, the optimiser, the schedules, the objective
    (dino_jax.objective: official DINO by default) and the center's momentum; with iBOT, the
    number of mask chunks of the batch (its masks come with the batch); with Gram anchoring,
    when its frozen teacher is refreshed."""

    model: MultiCropNetwork
    tx: optax.GradientTransformationExtraArgs
    schedules: Schedules
    objective: Objective = dataclasses.field(default_factory=dino_objective)
    center_momentum: float = 0.9
    ibot_chunks: int | None = None  # None: no iBOT masks
    gram: GramRefresh | None = None  # None: no Gram teacher
    # with skip_nonfinite: a skipped step's update as a lax.cond branch, not a select
    branch_updates: bool = False
    # the updates tied to the gradient's global norm (after_gradient)
    wait_for_gradient: bool = False
    # > 0: the student's logits made by the loss in this many batch chunks, never all at once
    # (dino.loss_chunks; dino_jax.loss.dino_cross_entropy_chunked)
    loss_chunks: int = 0
    # the state's networks and moments in flat groups (optim.flat_state): its optimiser,
    # used in place of `tx`, which still gives the per-tensor state checkpoints hold
    flat: FlatOptimizer | None = None


def finite_step(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """A step is good when its loss and gradient norm are finite: the test of
    train.skip_nonfinite_steps here and of the training loop's non-finite check."""
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def after_gradient(grad_norm: jax.Array, tree):
    """`tree` with its values unchanged while `grad_norm` is finite, made to depend on it.

    A weight is read by the backward pass's matmuls for the gradients of the layers below
    it, and those reads are no ancestors of its own update, which needs only its own
    gradient. XLA then cannot prove the reads come before the update overwrites the donated
    buffer and copies every such weight at the step's start (the ViT-S/16 step on one CPU
    device: about 170 MiB a step). Adding `0 * grad_norm` (a float multiply by zero, which
    XLA keeps: it is NaN for a non-finite norm) makes every update wait for the global norm,
    which every gradient, hence every one of those reads, precedes. A non-finite norm makes
    the whole update non-finite, where it made only some tensors so: such a step is skipped
    (train.skip_nonfinite_steps) or stops the run before it is saved either way.
    """
    zero = grad_norm * 0.0
    return jax.tree.map(lambda x: x + zero.astype(x.dtype), tree)


def call_objective(objective: Objective, outputs: StepOutputs):
    """`objective(outputs)`; an objective that fails on the logits dino.loss_chunks leaves
    out (student_logits None) gets an error that says so."""
    try:
        return objective(outputs)
    except (AttributeError, TypeError) as err:
        if outputs.student_logits is not None:
            raise
        raise TypeError(
            f"the objective failed ({err}) with dino.loss_chunks={outputs.logits_chunks}, where"
            " the student's logits are never made (StepOutputs.student_logits is None): set"
            " dino.loss_chunks=0, or take DINO's term from"
            " dino_jax.objective.student_cross_entropy"
        ) from err


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
    # over the crop and batch axes in place: a reshape merging them would gather a sharded
    # batch onto every device
    mean_q = q.mean(axis=tuple(range(q.ndim - 1)))
    kl_uniform = jnp.sum(mean_q * jnp.log(jnp.maximum(mean_q, 1e-30))) + jnp.log(k)
    return {
        "collapse/teacher_entropy": entropy,
        "collapse/entropy_max": jnp.log(jnp.float32(k)),
        "collapse/kl_uniform": kl_uniform,
        "collapse/center_norm": jnp.linalg.norm(center),
    }


def dino_update(
    state: TrainState,
    crops: Sequence[jax.Array],
    key: jax.Array,
    hp: DinoHParams,
    masks: dict[str, jax.Array] | None = None,
    *,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict]:
    """One official training iteration on already-augmented crops.

    crops: groups of equal resolution, (B, n, H, W, C) each, the 2 global crops first.
    Order as train_one_epoch: teacher forward on the global crops, student forward on all,
    loss, gradient, per-tensor clip, the optimiser step (last layer skipped while frozen),
    teacher EMA of the parameters; the center moves after the loss, from the teacher logits
    of this batch. BatchNorm running statistics move with each network's own forward passes.

    masks (iBOT; dino_jax.data.masking.StepMasks): "masks" (B, n_global, N) bool, the
    student's masked patches of the global crops; "mask_index" / "mask_weight" (B, capacity),
    each chunk's masked tokens and their weights. As DINOv2's ssl_meta_arch: the teacher sees
    the unmasked crops, both networks' patch heads run on the gathered masked tokens, and the
    patch center moves after the loss. With a Gram teacher (hp.gram), it is refreshed from
    the EMA teacher when due, before its forward on the global crops.

    With `hp.flat` (optim.flat_state) the student, the teacher and the optimiser's state are
    flat groups of tensors (dino_jax.optim_flat): the networks read their tensors as slices of
    them, and `hp.flat` updates them where `hp.tx` would update the per-tensor state.

    With `skip_nonfinite`, a step whose loss or gradient norm is not finite leaves the state
    as it was but for the step count (the Gram teacher's refresh included), and the metrics
    gain "train/skipped" (1.0 for such a step).
    """
    sch = hp.schedules
    step = state.step
    teacher_temp = sch.teacher_temp_at(step)
    patch_index = patch_weights = student_masks = None
    if masks is not None:
        patch_index = masks["mask_index"].reshape(hp.ibot_chunks, -1)
        patch_weights = masks["mask_weight"].reshape(hp.ibot_chunks, -1)
        student_masks = masks["masks"]
    # Both networks normalise with batch statistics and update their own running ones.
    # the networks as trees of tensors (views of the flat groups with optim.flat_state)
    student_params, teacher_params = as_tree(state.student), as_tree(state.teacher)
    t_out, t_stats = hp.model.apply(
        variables(teacher_params, state.teacher_stats),
        crops[:1],
        use_running_average=False,
        return_features=True,
        patch_index=patch_index,
        mutable=["batch_stats"],
    )
    t_out = jax.lax.stop_gradient(t_out)
    extras = dict(state.extras)
    gram_tokens = None
    if hp.gram is not None:
        due = hp.gram.due(step)
        extras["gram_teacher"] = jax.tree.map(
            lambda frozen, ema_now: jnp.where(due, ema_now, frozen),
            state.extras["gram_teacher"],
            teacher_params["backbone"],
        )
        gram_tokens = jax.lax.stop_gradient(
            hp.model.apply(
                {"params": {"backbone": extras["gram_teacher"]}},
                crops[0],
                method=MultiCropNetwork.global_patch_tokens,
            )
        )

    def loss_fn(student):
        s_out, s_stats = hp.model.apply(
            variables(student, state.student_stats),
            crops,
            train=True,
            use_running_average=False,
            return_features=True,
            masks=student_masks,
            patch_index=patch_index,
            mutable=["batch_stats"],
            # "rope": DINOv3's RoPE coordinate augmentations (unused by other backbones)
            rngs={"drop_path": key, "rope": jax.random.fold_in(key, 1)},
            head_logits=not hp.loss_chunks,
        )
        outputs = StepOutputs(
            student_logits=s_out.logits,  # (n_crops, B, K); None with loss_chunks
            teacher_logits=t_out.logits,  # (2, B, K)
            student_features=s_out.features,  # (n_crops, B, D)
            teacher_features=t_out.features,  # (2, B, D)
            center=state.center,
            teacher_temp=teacher_temp,
            step=step,
            student_patch_tokens=s_out.patch_tokens,
            teacher_patch_tokens=t_out.patch_tokens,
            patch_masks=None if student_masks is None else jnp.swapaxes(student_masks, 0, 1),
            student_patch_logits=s_out.patch_logits,
            teacher_patch_logits=t_out.patch_logits,
            patch_weights=patch_weights,
            patch_center=extras.get("patch_center"),
            gram_patch_tokens=gram_tokens,
            student_embeddings=s_out.embeddings,
            student_prototypes=s_out.prototypes,
            logits_dtype=hp.model.head.dtype,
            logits_chunks=hp.loss_chunks,
        )
        with jax.named_scope("loss"):
            loss, terms = check_objective_result(call_objective(hp.objective, outputs))
        return loss, (s_stats, terms)

    (loss, (s_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(student_params)
    momentum = ema_momentum = sch.momentum(step)
    with jax.named_scope("optimizer"):
        grad_norm = global_norm(grads)
        if hp.wait_for_gradient:  # the teacher's EMA too: its fixed gains have no gradient
            grads, ema_momentum = after_gradient(grad_norm, (grads, momentum))

    with jax.named_scope("loss"):
        collapse = collapse_metrics(t_out.logits, state.center, teacher_temp)

    def updated() -> TrainState:
        with jax.named_scope("optimizer"):
            tx = hp.tx if hp.flat is None else hp.flat
            updates, opt_state = tx.update(grads, state.opt_state, state.student, step=step)
            student = optax.apply_updates(state.student, updates)
        with jax.named_scope("ema"):
            teacher = ema(state.teacher, student, ema_momentum)
        new_extras = dict(extras)
        with jax.named_scope("loss"):
            if masks is not None:
                new_extras["patch_center"] = update_patch_center_per_chunk(
                    extras["patch_center"], t_out.patch_logits, patch_weights, hp.center_momentum
                )
            center = update_center(state.center, t_out.logits, hp.center_momentum)
            if hp.wait_for_gradient:  # after the metrics' read of the old one: in place
                center = after_gradient(sum(collapse.values()), center)
        return state.replace(
            step=step + 1,
            student=student,
            teacher=teacher,
            opt_state=opt_state,
            center=center,
            student_stats=dict(s_stats.get("batch_stats", {})),
            teacher_stats=dict(t_stats.get("batch_stats", {})),
            extras=new_extras,
        )

    if skip_nonfinite:
        ok = finite_step(loss, grad_norm)
        if hp.branch_updates:  # no copies of the donated state; a conditional in the step
            new_state = jax.lax.cond(ok, updated, lambda: state.replace(step=step + 1))
        else:  # a select of the new and the old state: XLA copies the state's buffers
            kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), updated(), state)
            new_state = kept.replace(step=step + 1)
    else:
        new_state = updated()
    metrics = {
        **terms,
        "train/loss": loss,
        "train/lr": sch.lr(step),
        "train/wd": sch.wd(step),
        "train/momentum": momentum,
        "train/teacher_temp": teacher_temp,
        "train/grad_norm": grad_norm,
        **collapse,
    }
    if skip_nonfinite:
        metrics["train/skipped"] = (~ok).astype(jnp.float32)
    return new_state, metrics


MASK_KEYS = ("masks", "mask_index", "mask_weight")


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
    with jax.named_scope("augment"):
        keys = jax.random.split(aug_key, batch["image"].shape[0])
        global_crops, local_crops = multicrop(
            keys, batch["image"], batch["size"], aug, dtype=compute_dtype
        )
    crops = (global_crops, local_crops) if aug.n_local else (global_crops,)
    masks = None
    if hp.ibot_chunks is not None:
        if not all(k in batch for k in MASK_KEYS):
            raise ValueError(
                f"iBOT needs the step's masks in the batch ({', '.join(MASK_KEYS)}: see"
                " dino_jax.data.masking.StepMasks and trainer.Run.host_batches)"
            )
        masks = {k: batch[k] for k in MASK_KEYS}
    return dino_update(state, crops, drop_key, hp, masks, skip_nonfinite=skip_nonfinite)
