"""Comparison of training states (TrainState or any pytree of arrays), leaf by leaf."""

import jax
import numpy as np


def leaves(state) -> list[np.ndarray]:
    """The leaves of `state` as host numpy arrays, in tree order."""
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def assert_states_equal(a, b, **tol) -> None:
    """`a` and `b` have the same leaves: exactly equal, or within the np.testing.assert_allclose
    tolerances given (`rtol=`, `atol=`). A mismatch names the leaf's path in the tree."""
    la = jax.tree_util.tree_leaves_with_path(jax.device_get(a))
    lb = jax.tree_util.tree_leaves_with_path(jax.device_get(b))
    assert len(la) == len(lb), (len(la), len(lb))
    for (path, x), (_, y) in zip(la, lb, strict=True):
        name = jax.tree_util.keystr(path)
        if tol:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=name, **tol)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
