"""optim.flat_state (dino_jax/optim_flat.py): the student, the teacher and the moments in flat
groups while the run steps. The layout round trip is exact; training gives the per-tensor
states to float32 rounding (AdamW and SGD, across the last layer's unfreezing step, with a
skipped non-finite step's machinery and the branches on); a resume may switch the layout; the
compiled step has fewer optimiser and EMA kernels and copies no donated buffer. The four
official steps at their bounds are in tests/test_train_step_parity.py."""

import jax
import numpy as np
import pytest
from helpers.fault_helpers import logged
from helpers.states import assert_states_equal
from helpers.tiny import tiny_config

from dino_jax import parallel, validation
from dino_jax.bench import hlo_copies, hlo_groups
from dino_jax.checkpoint_resume import CheckpointError
from dino_jax.config import ConfigError
from dino_jax.data.pipeline import to_global
from dino_jax.optim_flat import FlatParams
from dino_jax.trainer import build_run, compile_step, initial_state, train

# 2 steps per epoch at batch 16: the last layer is frozen at steps 0 and 1, trained from step 2
SHORT = {
    "data.source": "synthetic",
    "data.synthetic_examples": 32,
    "data.synthetic_classes": 2,
    "optim.epochs": 3,
    "optim.freeze_last_layer": 1,
    "train.max_steps": 4,
    "train.checkpoint_every_steps": 2,
}


def short_config(**overrides):
    return tiny_config(**{**SHORT, **overrides})


def test_the_layout_round_trip_is_exact():
    run = build_run(short_config(**{"optim.flat_state": True}))
    state = jax.device_get(initial_state(run))
    flat = run.hp.flat
    assert set(flat.layout.names) == {
        "updated/decay/float32",
        "updated/no_decay/float32",
        "some_steps/decay/float32",  # the last layer, frozen in the first epoch
        "fixed/decay/float32",  # the prototype gains, fixed at 1 with norm_last_layer
    }
    stepping = flat.to_flat(state)
    assert isinstance(stepping.student, FlatParams)
    assert sum(x.size for x in jax.tree.leaves(stepping.student)) == sum(
        x.size for x in jax.tree.leaves(state.student)
    )
    assert_states_equal(flat.to_tree(stepping), state)


def trained(workdir, **overrides):
    result = train(short_config(**overrides), str(workdir))
    assert result.status == "max_steps" and int(result.state.step) == SHORT["train.max_steps"]
    return result


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "optim.optimizer": "sgd",
            "optim.branch_updates": True,
            "optim.wait_for_gradient": True,
            "train.skip_nonfinite_steps": 1,
        },
    ],
    ids=["adamw", "sgd_branches_skip"],
)
def test_training_matches_the_per_tensor_state(tmp_path, overrides):
    """Four steps on 8 devices, the last layer unfrozen at the third: every state leaf and
    every logged loss of the per-tensor run."""
    tensors = trained(tmp_path / "tensors", **overrides)
    flat = trained(tmp_path / "flat", **overrides, **{"optim.flat_state": True})
    losses = [logged(tmp_path / name, "train/loss") for name in ("flat", "tensors")]
    assert losses[0] and len(losses[0]) == len(losses[1])
    np.testing.assert_allclose(*losses, rtol=1e-6)
    assert_states_equal(flat.state, tensors.state, rtol=1e-5, atol=1e-7)


def test_a_resume_may_switch_the_layout(tmp_path):
    """Checkpoints hold the per-tensor state either way: two steps flat, then two per tensor,
    give the four steps of a per-tensor run."""
    straight = trained(tmp_path / "straight")
    switched = tmp_path / "switched"
    train(short_config(**{"optim.flat_state": True, "train.max_steps": 2}), str(switched))
    resumed = trained(switched)
    assert_states_equal(resumed.state, straight.state, rtol=1e-5, atol=1e-7)


def test_different_counts_within_a_group_are_refused():
    """One step count serves a group: a state whose tensors' counts differ is refused with
    what to do, not merged."""
    run = build_run(short_config(**{"optim.flat_state": True}))
    state = initial_state(run)
    counts = state.opt_state[1].count
    counts["backbone"]["cls_token"] = counts["backbone"]["cls_token"] + 1
    with pytest.raises(CheckpointError, match=r"optim.flat_state=False"):
        run.to_step(state)


# the tiny ViT under the official head's sizes, where the per-tensor select copies moments
HEAD = {"model.out_dim": 4096, "model.head_hidden_dim": 2048, "model.head_bottleneck_dim": 256}


def compiled_text(**overrides) -> str:
    config = tiny_config(**HEAD, **overrides)
    run = build_run(config, mesh=parallel.make_mesh(jax.devices()[:1]))
    batch = to_global(next(run.host_batches()), run.mesh)
    state = run.to_step(initial_state(run))
    return compile_step(run).lower(state, batch, jax.random.key(0)).compile().as_text()


def optimizer_ops(text: str) -> int:
    return hlo_groups.entry_ops(text)["optimizer+EMA"]


def test_fewer_optimizer_kernels_and_no_copies():
    """The optimiser, clip and EMA compile to fewer ops than per tensor, and with the branches
    and the wait for the gradient no state buffer is copied (the per-tensor step counts are,
    per tensor) but the 4-byte step number."""
    options = {"optim.branch_updates": True, "optim.wait_for_gradient": True}
    tensors = compiled_text(**options)
    flat = compiled_text(**options, **{"optim.flat_state": True})
    assert optimizer_ops(flat) < 0.6 * optimizer_ops(tensors), (
        optimizer_ops(flat),
        optimizer_ops(tensors),
    )
    assert any("count" in k for k in hlo_copies.state_copies(tensors))
    # the step number, an int32 the schedules read in many scalar ops, is all that is left
    assert set(hlo_copies.state_copies(flat)) <= {"state_step.1"}, hlo_copies.state_copies(flat)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optim.optimizer": "lars"}, "LARS scales each tensor by its own trust ratio"),
        ({"train.fsdp": True}, "FSDP splits each tensor over the devices"),
    ],
)
def test_combinations_without_a_flat_form_are_refused(overrides, message):
    config = tiny_config(**{"optim.flat_state": True, **overrides})
    with pytest.raises(ConfigError, match=message):
        validation.validate(config, num_devices=8)
