"""optim.wait_for_gradient: every update tied to the gradient's global norm (so that XLA can
overwrite the donated weights in place, tests/test_optim_copies.py) trains as the default to
float32 summation order, skipped non-finite steps included (dino_jax/train_step.py
after_gradient)."""

import jax.numpy as jnp
import numpy as np
from helpers.fault_helpers import logged, poison
from helpers.states import assert_states_equal
from helpers.tiny import tiny_config

from dino_jax.train_step import after_gradient
from dino_jax.trainer import train


def both(tmp_path, overrides: dict) -> dict:
    """The tiny run without and with optim.wait_for_gradient, in work directories named
    False and True."""
    return {
        wait: train(
            tiny_config(**overrides, **{"optim.wait_for_gradient": wait}), str(tmp_path / str(wait))
        )
        for wait in (False, True)
    }


def test_after_gradient_keeps_values_and_spreads_a_non_finite_norm():
    tree = {"w": jnp.array([[1.5, -0.0], [3.0, -2.0]]), "m": jnp.float32(0.996)}
    kept = after_gradient(jnp.float32(7.0), tree)
    for name in tree:
        np.testing.assert_array_equal(kept[name], tree[name])
    for bad in (jnp.nan, jnp.inf):
        spoilt = after_gradient(jnp.float32(bad), tree)
        assert not any(np.isfinite(x).any() for x in spoilt.values())


def test_waiting_for_the_gradient_trains_as_the_default(tmp_path, monkeypatch):
    """Three steps, equal to float32 summation order (adding a zero changes no value, but XLA
    may sum a gradient in another order in the other program: bit for bit on a Xeon, 1e-6
    apart on an AMD EPYC); the second, a NaN batch under train.skip_nonfinite_steps, makes
    the whole update NaN when it waits for the (NaN) norm, and is dropped all the same."""
    poison(monkeypatch, [1])
    base = {"train.max_steps": 3, "train.skip_nonfinite_steps": 1}
    results = both(tmp_path, base)
    assert all(r.status == "max_steps" and int(r.state.step) == 3 for r in results.values())
    assert logged(tmp_path / "True", "train/skipped") == logged(tmp_path / "False", "train/skipped")
    np.testing.assert_allclose(
        logged(tmp_path / "True", "train/loss"), logged(tmp_path / "False", "train/loss"), rtol=1e-6
    )
    assert_states_equal(results[False].state, results[True].state, rtol=1e-5, atol=1e-7)
