"""Helpers shared by the parity tests: fixture loading and error measures."""

from __future__ import annotations

import numpy as np

from dino_jax.interop.state_dict import from_state_dict


def fixture_params(data, prefix: str) -> dict:
    """Flax params from the `param/<prefix>...` entries of a fixture .npz."""
    state = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/" + prefix)}
    params, buffers = from_state_dict(state, prefix)
    assert not buffers
    return params


def max_rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the acceptance measure of the parity tests."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def nchw_to_nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def train_steps_schedules():
    """The schedules of the official run recorded in train_steps.npz (see its README)."""
    from dino_jax.schedules import Schedules

    return Schedules(
        steps_per_epoch=2,
        epochs=10,
        base_lr=0.0005 * 4 / 256,
        min_lr=1e-6,
        warmup_epochs=1,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
        teacher_temp=0.07,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=3,
        freeze_last_layer=1,
    )


def official_crops(data, s):
    """The 2 global and 2 local crops of step `s` of a training-steps fixture, as our
    (B, n, H, W, C) groups."""
    import jax.numpy as jnp

    crop = [nchw_to_nhwc(data[f"in/step{s}/crop{c}"]) for c in range(4)]
    return (jnp.stack(crop[:2], axis=1), jnp.stack(crop[2:], axis=1))


def run_updates(hp, state, data, n_steps):
    """`n_steps` jitted dino_update calls on a fixture's crops: the states (the first one
    included) and the host metrics of each step."""
    import functools

    import jax

    from dino_jax.train_step import dino_update

    update = jax.jit(functools.partial(dino_update, hp=hp))
    states, metrics = [state], []
    for s in range(n_steps):
        state, m = update(state, official_crops(data, s), jax.random.key(0))
        states.append(state)
        metrics.append(jax.device_get(m))
    return states, metrics
