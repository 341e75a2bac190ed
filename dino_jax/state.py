"""The train state as data: step, student and teacher params, optimiser state, center."""

from __future__ import annotations

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


def create_state(student: PyTree, tx: optax.GradientTransformation, out_dim: int) -> TrainState:
    """Fresh state: the teacher starts equal to the student (its own copy), center zeros."""
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        student=student,
        teacher=jax.tree.map(jnp.copy, student),
        opt_state=tx.init(student),
        center=jnp.zeros((1, out_dim), jnp.float32),
    )


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
    variables = model.init({"params": key}, crops)
    return create_state(variables["params"], tx, model.head.out_dim)


def abstract_state(model, tx: optax.GradientTransformation, crops) -> TrainState:
    """Shapes and dtypes of init_state's result, traced without computing anything."""
    return jax.eval_shape(lambda key: init_state(model, tx, crops, key), jax.random.key(0))
