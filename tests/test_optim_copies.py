"""optim.branch_updates: with it, the compiled train step updates the donated state in place
(no Adam moment copied; with train.skip_nonfinite_steps, no state buffer); without it, the
select of the new and the old values makes XLA copy the last layer's moments, and with
skip_nonfinite_steps most of the state (dino_jax/optim.py leafwise, dino_jax/train_step.py;
dino_jax/bench/hlo_copies.py counts the copies). optim.wait_for_gradient: without it the
weights the backward pass reads for the layers below are copied; with it, none.

Each setting is compiled once and shared by the tests."""

import functools

import jax
from helpers.tiny import tiny_config

from dino_jax import parallel
from dino_jax.bench import hlo_copies
from dino_jax.data.pipeline import to_global
from dino_jax.starting_state import initial_state
from dino_jax.trainer import build_run, compile_step

# the tiny ViT under the official head's hidden and bottleneck sizes: XLA's choice to copy
# depends on the sizes, and at these the select form makes it
HEAD = {"model.out_dim": 4096, "model.head_hidden_dim": 2048, "model.head_bottleneck_dim": 256}


def state_copies(**options) -> dict[str, int]:
    """The state buffers the compiled train step copies, with their bytes (the per-tensor
    step counts, int32 scalars, are left out)."""
    return compiled_copies(tuple(sorted(options.items())))


@functools.cache
def compiled_copies(options: tuple) -> dict[str, int]:
    config = tiny_config(**HEAD, **dict(options))
    # on one device, as on one GPU: split over the suite's 8 CPU devices XLA does not copy
    run = build_run(config, mesh=parallel.make_mesh(jax.devices()[:1]))
    state = run.to_step(initial_state(run))
    batch = to_global(next(run.host_batches()), run.mesh)
    text = compile_step(run).lower(state, batch, jax.random.key(0)).compile().as_text()
    return {k: v for k, v in hlo_copies.state_copies(text).items() if "count" not in k}


def moments(copies: dict[str, int]) -> list[str]:
    return [k for k in copies if k.startswith("state_opt_state")]


def test_branch_updates_copy_no_adam_moment():
    assert moments(state_copies(**{"optim.branch_updates": True})) == []


def test_the_select_copies_the_last_layers_moments():
    copied = moments(state_copies())
    assert copied and all("last_layer" in name for name in copied), copied


def test_skipping_non_finite_steps_copies_the_state_unless_branched():
    skip = {"train.skip_nonfinite_steps": 1}
    selected = state_copies(**skip)
    branched = state_copies(**skip, **{"optim.branch_updates": True})
    assert len(moments(selected)) > 10, sorted(selected)  # every moment, not only the last layer's
    assert moments(branched) == [] and sum(branched.values()) < sum(selected.values()) / 100


def test_waiting_for_the_gradient_copies_no_weight():
    """The head's weights (their backward reads feed only the layers below) are copied unless
    every update waits for the gradient's norm; then no array is, the center included (its
    norm, a metric, is read apart from its update, which waits for the metrics)."""
    branch = {"optim.branch_updates": True}
    weights = [k for k in state_copies(**branch) if k.startswith("state_student")]
    assert any("head" in k for k in weights), weights
    waiting = state_copies(**branch, **{"optim.wait_for_gradient": True})
    arrays = [k.split(".")[0] for k, size in waiting.items() if size > 4]  # not the step count
    assert arrays == [], sorted(waiting)
