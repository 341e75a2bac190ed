"""The train state as data: step, student and teacher params, optimiser state, center, and the
BatchNorm running statistics of each network."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

PyTree = Any


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates done
    student: PyTree  # params {'backbone': ..., 'head': ...}
    teacher: PyTree  # the EMA of the student, same structure
    opt_state: optax.OptState
    center: jax.Array  # (1, K) float32, EMA of the teacher's mean output
    # The Flax `batch_stats` collection of each network ({} without BatchNorm). The teacher
    # keeps its own: it normalises with its own batch statistics, and the EMA covers
    # parameters only, as in the official code.
    student_stats: PyTree = dataclasses.field(default_factory=dict)
    teacher_stats: PyTree = dataclasses.field(default_factory=dict)
    # The state of the optional objective pieces ({} for DINO): "patch_center" (1, K_patch),
    # iBOT's center of the teacher's patch logits; "gram_teacher", the frozen backbone params
    # DINOv3's Gram anchoring compares with (dino_jax.objective, dino_jax.train_step).
    extras: PyTree = dataclasses.field(default_factory=dict)


def create_state(
    student: PyTree,
    tx: optax.GradientTransformation,
    out_dim: int,
    batch_stats: PyTree | None = None,
) -> TrainState:
    """Fresh state: the teacher starts equal to the student (its own copy of the parameters
    and of the running statistics, as the official `load_state_dict`), center zeros."""
    stats = {} if batch_stats is None else batch_stats
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        student=student,
        teacher=jax.tree.map(jnp.copy, student),
        opt_state=tx.init(student),
        center=jnp.zeros((1, out_dim), jnp.float32),
        student_stats=stats,
        teacher_stats=jax.tree.map(jnp.copy, stats),
    )


def variables(params: PyTree, batch_stats: PyTree) -> dict:
    """The Flax variables of one network: its params, and its running statistics if any."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def backbone_variables(params: PyTree, batch_stats: PyTree) -> dict:
    """The variables of the backbone alone, from a network's params and batch stats."""
    return variables(params["backbone"], batch_stats.get("backbone", {}) if batch_stats else {})


def ema(teacher: PyTree, student: PyTree, momentum: jax.Array) -> PyTree:
    """theta_t <- m theta_t + (1 - m) theta_s over every parameter (the gains included)."""
    return jax.tree.map(
        lambda t, s: (t * momentum + s * (1.0 - momentum)).astype(t.dtype), teacher, student
    )


def sample_crops(aug, dtype, batch: int = 2) -> tuple[jax.Array, ...]:
    """Zero crops with the shapes of one multi-crop batch (`aug`: a MultiCropConfig): what
    the network is initialised (and its abstract state traced) with."""
    groups = [jnp.zeros((batch, aug.n_global, aug.global_size, aug.global_size, 3), dtype)]
    if aug.n_local:
        groups.append(jnp.zeros((batch, aug.n_local, aug.local_size, aug.local_size, 3), dtype))
    return tuple(groups)


def init_state(model, tx: optax.GradientTransformation, crops, key: jax.Array) -> TrainState:
    """The state of a run before its first step: `model` initialised from `key` on `crops`."""
    init = model.init({"params": key}, crops)
    return create_state(init["params"], tx, model.head.out_dim, dict(init.get("batch_stats", {})))


def abstract_state(model, tx: optax.GradientTransformation, crops) -> TrainState:
    """Shapes and dtypes of init_state's result, traced without computing anything."""
    return jax.eval_shape(lambda key: init_state(model, tx, crops, key), jax.random.key(0))
