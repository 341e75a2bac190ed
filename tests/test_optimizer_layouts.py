"""scripts/optimizer_layouts.py: its three layouts compute the same update (so its kernel
counts and times compare like with like), and it runs end to end at a small size."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
from helpers.fault_helpers import ROOT

_spec = importlib.util.spec_from_file_location("layouts", ROOT / "scripts/optimizer_layouts.py")
layouts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layouts)


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_the_layouts_give_the_same_update():
    sizes = layouts.shapes(blocks=1, prototypes=64, dim=8)
    keys = jax.random.split(jax.random.key(1), 4 * len(sizes))
    draws = [jax.random.normal(k, s) for k, s in zip(keys, sizes * 4, strict=True)]
    grads = [10 * g for g in draws[: len(sizes)]]  # large enough for the clip to act
    student, teacher, mu = (draws[i * len(sizes) : (i + 1) * len(sizes)] for i in (1, 2, 3))
    nu = [jnp.square(m) for m in mu]
    t = jnp.float32(3.0)
    expected = flat(layouts.per_tensor(grads, student, teacher, mu, nu, t))
    concat = flat(layouts.concatenated(grads, student, teacher, mu, nu, t))
    whole = layouts.flat_state(
        grads, *(jnp.asarray(flat(x)) for x in (student, teacher, mu, nu)), t
    )
    np.testing.assert_allclose(concat, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(flat(whole), expected, rtol=1e-6, atol=1e-7)


def test_it_measures_every_layout(capsys):
    results = layouts.main(["--blocks", "1", "--prototypes", "64", "--repeats", "1"])
    assert [r["layout"] for r in results] == ["tensors", "concat", "flat"]
    assert all(r["fusions"] > 0 and r["update_ms"] > 0 for r in results)
    assert len(capsys.readouterr().out.splitlines()) == 3
