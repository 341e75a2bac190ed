"""Training states (TrainState or any pytree of arrays): leaf-by-leaf comparison, and the first
steps of a config run on meshes of several sizes."""

import dataclasses

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


@dataclasses.dataclass
class MeshRun:
    """One device count's run of the first steps of a config (see steps_on_meshes)."""

    start: object  # the initial state, on the host (the device copy is donated)
    final: object  # the state after the steps, on the devices
    metrics: dict  # the last step's metrics, on the host
    step: object  # the compiled step


def steps_on_meshes(config, n_steps: int, device_counts=(8, 1)) -> dict[int, MeshRun]:
    """The trainer's state and compiled step for `config` on meshes of the first n devices,
    each fed the same first `n_steps` batches (read once, from the first run's stream)."""
    from dino_jax import parallel
    from dino_jax.data.pipeline import to_global
    from dino_jax.trainer import build_run, compile_step, initial_state

    runs = {n: build_run(config, mesh=parallel.make_mesh(jax.devices()[:n])) for n in device_counts}
    first = runs[device_counts[0]]
    batches = [b for _, b in zip(range(n_steps), first.host_batches(), strict=False)]
    out = {}
    for n, run in runs.items():
        state, step = initial_state(run), compile_step(run)
        start = jax.device_get(state)
        for batch in batches:
            state, metrics = step(state, to_global(batch, run.mesh), jax.random.key(0))
        out[n] = MeshRun(start, state, jax.device_get(metrics), step)
    return out
