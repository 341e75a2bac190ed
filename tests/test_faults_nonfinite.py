"""Non-finite losses and updates: the run stops naming the step and the last good checkpoint,
which is intact; train.skip_nonfinite_steps=N rides over up to N bad steps in a row."""

import re

import jax
import numpy as np
import pytest
from helpers.fault_helpers import finalised_steps, logged, poison, restore
from helpers.states import assert_states_equal, leaves
from helpers.tiny import tiny_config

from dino_jax.checkpoint import Checkpointer
from dino_jax.trainer import NonFiniteLossError, train


@pytest.fixture
def saved(monkeypatch):
    """The state of every checkpoint as it was handed to the Checkpointer, by step."""
    states = {}
    save = Checkpointer.save

    def capturing(self, state, meta, **kw):
        states[int(state.step)] = jax.device_get(state)
        return save(self, state, meta, **kw)

    monkeypatch.setattr(Checkpointer, "save", capturing)
    return states


def failing_step(message: str) -> int:
    return int(re.search(r"at step (\d+)", message).group(1))


def assert_intact(tmp_path, step: int, expected) -> None:
    state = restore(tmp_path, step)
    assert all(np.isfinite(x).all() for x in leaves(state) if x.dtype.kind == "f")
    assert_states_equal(state, expected)


def test_hostile_learning_rate_stops_and_keeps_the_last_good_checkpoint(tmp_path, tally):
    with tally.fault():
        good = train(tiny_config(**{"train.max_steps": 3}), str(tmp_path))
        hostile = tiny_config(
            **{"train.max_steps": 30, "optim.lr": 1e30, "train.allow_config_change": True}
        )
        with pytest.raises(NonFiniteLossError) as err:
            train(hostile, str(tmp_path))
        message = str(err.value)
        assert "non-finite" in message and failing_step(message) >= 3
        assert "the last good checkpoint is step 3" in message
        assert finalised_steps(tmp_path) == [3]
        assert_intact(tmp_path, 3, good.state)


def test_nan_batch_stops_naming_the_step_and_the_intact_checkpoint(
    tmp_path, tally, monkeypatch, saved
):
    with tally.fault():
        poison(monkeypatch, [7])
        with pytest.raises(NonFiniteLossError) as err:
            train(tiny_config(**{"train.max_steps": 30}), str(tmp_path))
        message = str(err.value)
        assert "non-finite loss at step 7" in message
        assert "the last good checkpoint is step 6" in message
        assert finalised_steps(tmp_path) == [3, 6]
        assert_intact(tmp_path, 6, saved[6])


def test_non_finite_update_with_a_finite_loss_is_never_saved(tmp_path, tally, monkeypatch, saved):
    with tally.fault():
        poison(monkeypatch, [5], where="update")  # the state after 6 updates, saved at 6, is NaN
        with pytest.raises(NonFiniteLossError) as err:
            train(tiny_config(**{"train.max_steps": 30}), str(tmp_path))
        message = str(err.value)
        assert "last good checkpoint is step 3" in message
        assert finalised_steps(tmp_path) == [3]
        assert_intact(tmp_path, 3, saved[3])


def test_skip_nonfinite_steps_rides_over_n_bad_steps_not_n_plus_1(
    tmp_path, tally, monkeypatch, saved
):
    poison(monkeypatch, [4, 5, 6])  # one program for both runs: the first stops before step 6
    with tally.fault():
        config = tiny_config(
            **{
                "train.max_steps": 6,
                "train.skip_nonfinite_steps": 2,
                "train.checkpoint_every_steps": 4,
            }
        )
        result = train(config, str(tmp_path / "two"))
        assert result.status == "max_steps" and int(result.state.step) == 6
        # Both bad updates were skipped: the state is the one saved before them.
        assert_states_equal(result.state.replace(step=saved[4].step), saved[4])
        assert logged(tmp_path / "two", "train/skipped")[-1] == (6, 1.0)
    with tally.fault():
        config.train.max_steps = 8
        with pytest.raises(NonFiniteLossError) as err:
            train(config, str(tmp_path / "three"))
        assert "non-finite loss at step 6" in str(err.value)
        assert "the last good checkpoint is step 4" in str(err.value)


def test_a_skipped_step_as_a_branch_leaves_the_state_of_the_select(tmp_path, monkeypatch):
    """optim.branch_updates: the skipped update as a lax.cond branch trains as the select of
    the new and the old state (a NaN batch at step 1 of 3), up to float32 summation order:
    XLA fuses the center's batch mean differently inside the branch (1 ulp)."""
    poison(monkeypatch, [1])
    base = {"train.max_steps": 3, "train.skip_nonfinite_steps": 1}
    results = [
        train(tiny_config(**base, **{"optim.branch_updates": branch}), str(tmp_path / str(branch)))
        for branch in (False, True)
    ]
    assert all(r.status == "max_steps" and int(r.state.step) == 3 for r in results)
    assert logged(tmp_path / "True", "train/skipped") == logged(tmp_path / "False", "train/skipped")
    assert_states_equal(results[0].state, results[1].state, rtol=1e-5, atol=1e-7)
