"""Where a run's state starts: a fresh initialisation from the seed, or official weights
(`init_from`: a full `checkpoint.pth` or a backbone `*_pretrain.pth`) placed into it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.checkpoint_resume import CheckpointError
from dino_jax.state import TrainState


def check_init_from(config) -> None:
    """Refuse (CheckpointError) an init_from file that cannot start the configured model,
    reading the file's structure only: nothing is built or compiled."""
    if not config.init_from:
        return
    from dino_jax.interop import official

    try:
        official.check_init_from(config.init_from, config.model, config.aug.global_size)
    except official.OfficialCheckpointError as err:  # its message names the file
        raise CheckpointError(str(err)) from None


def initial_state(run) -> TrainState:
    """A fresh sharded state, or one started from an official checkpoint (init_from)."""
    key = jax.random.key(run.config.seed)
    state = jax.jit(run.recipe.init_state, out_shardings=run.state_sharding)(key)
    if run.config.init_from:
        state = start_from_official(run, state)
    return state


def start_from_official(run, state: TrainState) -> TrainState:
    """`state` with the networks of `run.config.init_from` (`run`: a trainer.Run); the
    optimiser starts afresh; the center too unless the file has one of this size."""
    from dino_jax.interop.official import load_official

    config = run.config  # shapes checked before any tensor is read; AdamW state not read
    ckpt = load_official(
        config.init_from, config.model, img_size=config.aug.global_size, optimizer=False
    )
    teacher, teacher_stats = ckpt.teacher, ckpt.teacher_stats
    student, student_stats = ckpt.student, ckpt.student_stats
    if student is None:  # a backbone file: both networks start from it
        student, student_stats = teacher, teacher_stats
    if "head" not in teacher:  # backbone-only weights: keep our freshly initialised head
        teacher = {"backbone": teacher["backbone"], "head": state.teacher["head"]}
        student = {"backbone": student["backbone"], "head": state.student["head"]}
        teacher_stats = _with_head(teacher_stats, state.teacher_stats)
        student_stats = _with_head(student_stats, state.student_stats)

    def place(ours, theirs, what):
        ours_shapes = jax.tree.map(jnp.shape, ours)
        theirs_shapes = jax.tree.map(np.shape, theirs)
        if ours_shapes != theirs_shapes:
            raise CheckpointError(
                f"init_from={run.config.init_from}: its {what} does not fit the configured"
                " model (compare model.arch / patch_size / out_dim / head settings with the"
                " checkpoint's)"
            )
        return jax.tree.map(
            lambda x, y: jax.device_put(np.asarray(y, x.dtype), x.sharding), ours, theirs
        )

    student = place(state.student, student, "student")
    state = state.replace(
        student=student,
        teacher=place(state.teacher, teacher, "teacher"),
        opt_state=run.hp.tx.init(student),
        student_stats=place(state.student_stats, student_stats, "student's BatchNorm statistics"),
        teacher_stats=place(state.teacher_stats, teacher_stats, "teacher's BatchNorm statistics"),
    )
    if ckpt.center is not None and ckpt.center.shape == state.center.shape:
        state = state.replace(center=jax.device_put(ckpt.center, state.center.sharding))
    return state


def _with_head(stats: dict, ours: dict) -> dict:
    """A backbone file's BatchNorm statistics with those of our freshly initialised head."""
    merged = {"backbone": stats["backbone"]} if "backbone" in stats else {}
    if "head" in ours:
        merged["head"] = ours["head"]
    return merged
