"""ResNet and XCiT students trained by the real loop on the bundled demo data: the BatchNorm
statistics live in the train state (the teacher's its own), a resumed run ends where an
uninterrupted one does, and 8 devices give the state of 1 (synchronised BatchNorm)."""

import jax
import numpy as np
import pytest
from helpers.parity import max_rel_err
from helpers.states import assert_states_equal, steps_on_meshes
from helpers.tiny import TINY_RESNET, TINY_XCIT, tiny_config

from dino_jax.trainer import train

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
    n_steps = 3
    runs = steps_on_meshes(config, n_steps)
    eight, one = runs[8].final, runs[1].final
    start_teacher_stats = runs[8].start.teacher_stats
    assert eight.student_stats and eight.teacher_stats  # BatchNorm state is in the train state
    # the teacher's statistics moved on their own batches: not a copy of the student's
    assert leaves_differ(eight.student_stats, eight.teacher_stats)
    assert leaves_differ(start_teacher_stats, eight.teacher_stats)
    counts = jax.tree.leaves(
        jax.tree.map(lambda x: x if x.dtype == np.int32 else None, eight.student_stats)
    )
    # the student's BatchNorms run once on the global crops and once on the local crops
    assert {int(c) for c in counts} == {2 * n_steps}
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
