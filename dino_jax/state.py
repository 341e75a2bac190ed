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
