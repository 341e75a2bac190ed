"""ResNet and XCiT students trained by the real loop on the bundled demo data: the BatchNorm
statistics live in the train state (the teacher's its own), a resumed run ends where an
uninterrupted one does, and 8 devices give the state of 1 (synchronised BatchNorm)."""

import jax
import numpy as np
import pytest
from helpers.parity import max_rel_err
from helpers.states import assert_states_equal
from helpers.tiny import TINY_RESNET, TINY_XCIT, tiny_config

from dino_jax import parallel
from dino_jax.data.pipeline import to_global
from dino_jax.trainer import build_run, compile_step, initial_state, train

CONFIGS = {
    "resnet": {**TINY_RESNET, "optim.optimizer": "sgd", "optim.lr": 0.03},
    "xcit": {**TINY_XCIT, "model.depth": 1, "optim.optimizer": "lars", "optim.lr": 0.3},
}


def config_for(name, **overrides):
    return tiny_config(**{**CONFIGS[name], **overrides})


def leaves_differ(a, b) -> bool:
    return any(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sharded_steps_equal_single_device(name):
    config = config_for(name)
    runs = {n: build_run(config, mesh=parallel.make_mesh(jax.devices()[:n])) for n in (8, 1)}
    batches = [b for _, b in zip(range(3), iter(runs[8].data), strict=False)]
    finals = {}
    for n, run in runs.items():
        state, step = initial_state(run), compile_step(run)
        start_teacher_stats = jax.device_get(state.teacher_stats)  # the state is donated
        for batch in batches:
            state, _ = step(state, to_global(batch, run.mesh), jax.random.key(0))
        finals[n] = state
    eight, one = finals[8], finals[1]
    assert eight.student_stats and eight.teacher_stats  # BatchNorm state is in the train state
    # the teacher's statistics moved on their own batches: not a copy of the student's
    assert leaves_differ(eight.student_stats, eight.teacher_stats)
    assert leaves_differ(start_teacher_stats, eight.teacher_stats)
    counts = jax.tree.leaves(
        jax.tree.map(lambda x: x if x.dtype == np.int32 else None, eight.student_stats)
    )
    # the student's BatchNorms run once on the global crops and once on the local crops
    assert {int(c) for c in counts} == {2 * len(batches)}
    # float32 sums in another order (the batch statistics and gradients reduced over 8
    # shards): measured up to 1.5e-5 of a tensor's largest value, on BatchNorm gradients
    for path, x, y in paired_leaves(eight, one):
        if np.any(y):
            assert max_rel_err(x, y) <= 1e-4, path
        else:  # e.g. the momentum of the last layer, frozen during these steps
            np.testing.assert_array_equal(x, y, err_msg=path)


def paired_leaves(a, b):
    la = jax.tree_util.tree_leaves_with_path(jax.device_get(a))
    lb = jax.tree_util.tree_leaves_with_path(jax.device_get(b))
    assert [p for p, _ in la] == [p for p, _ in lb]
    return [(jax.tree_util.keystr(p), x, y) for (p, x), (_, y) in zip(la, lb, strict=True)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_resume_equals_uninterrupted(name, tmp_path):
    straight = train(config_for(name, **{"train.max_steps": 5}), str(tmp_path / "a"))
    first = train(config_for(name, **{"train.max_steps": 3}), str(tmp_path / "b"))
    assert int(first.state.step) == 3
    resumed = train(config_for(name, **{"train.max_steps": 5}), str(tmp_path / "b"))
    assert int(resumed.state.step) == 5
    assert_states_equal(straight.state, resumed.state)
    assert jax.tree.leaves(resumed.state.teacher_stats)
