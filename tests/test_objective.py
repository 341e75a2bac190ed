"""The objective is a plain function of the step's outputs: the configured one reproduces the
official DINO loss, and a user's own objective trains through the unchanged trainer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.states import steps_on_meshes
from helpers.tiny import tiny_config

from dino_jax.loss import dino_loss
from dino_jax.objective import StepOutputs, dino_objective, objective_from_config, with_term
from dino_jax.trainer import train


def outputs(seed=0, crops=4, batch=6, k=32, dim=8):
    keys = jax.random.split(jax.random.key(seed), 4)
    # logits in [-1, 1], as the head's cosine similarities to unit prototypes
    return StepOutputs(
        student_logits=jnp.tanh(jax.random.normal(keys[0], (crops, batch, k))),
        teacher_logits=jnp.tanh(jax.random.normal(keys[1], (2, batch, k))),
        student_features=jax.random.normal(keys[2], (crops, batch, dim)),
        teacher_features=jax.random.normal(keys[3], (2, batch, dim)),
        center=jnp.full((1, k), 0.1),
        teacher_temp=jnp.float32(0.04),
        step=jnp.int32(0),
    )


def test_the_configured_objective_is_the_official_loss():
    out = outputs()
    loss, metrics = objective_from_config(tiny_config().dino)(out)
    expected = dino_loss(
        out.student_logits, out.teacher_logits, out.center, student_temp=0.1, teacher_temp=0.04
    )
    np.testing.assert_array_equal(loss, expected)
    assert set(metrics) == {"train/dino_loss"}


def test_a_term_adds_its_weighted_value_and_logs_it():
    out = outputs()
    base, _ = dino_objective()(out)
    combined = with_term(dino_objective(), lambda o: jnp.float32(2.0), 0.25, "train/two")
    loss, metrics = combined(out)
    np.testing.assert_allclose(loss, base + 0.5, rtol=1e-6)
    assert float(metrics["train/two"]) == 2.0


def spread_objective(out: StepOutputs):
    """A user's objective: DINO's loss minus 0.01 x the variance of the student's features."""
    loss, metrics = dino_objective()(out)
    spread = jnp.var(out.student_features, axis=1).mean()
    return loss - 0.01 * spread, {**metrics, "train/spread": spread}


def test_a_user_objective_trains_and_resumes_through_the_trainer(tmp_path):
    config = tiny_config(**{"train.max_steps": 4})
    default = train(config, str(tmp_path / "default"))
    straight = train(config, str(tmp_path / "user"), objective=spread_objective)
    lines = [json.loads(x) for x in (tmp_path / "user" / "train.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "train/spread" in x]
    assert logged and all(np.isfinite(x["train/spread"]) for x in logged)
    # the term changed the training: the states differ from the default objective's
    moved = jax.tree.leaves(jax.device_get(straight.state.student))
    plain = jax.tree.leaves(jax.device_get(default.state.student))
    assert any(not np.array_equal(a, b) for a, b in zip(moved, plain, strict=True))
    # and it resumes exactly with the same objective
    config.train.max_steps = 2
    train(config, str(tmp_path / "resumed"), objective=spread_objective)
    config.train.max_steps = 4
    resumed = train(config, str(tmp_path / "resumed"), objective=spread_objective)
    for a, b in zip(
        jax.tree.leaves(jax.device_get(resumed.state)),
        jax.tree.leaves(jax.device_get(straight.state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_an_objective_that_returns_the_wrong_thing_is_named(tmp_path):
    config = tiny_config(**{"train.max_steps": 1})
    with pytest.raises(TypeError, match=r"an objective returns \(loss, metrics\)"):
        train(config, str(tmp_path / "a"), objective=lambda out: dino_objective()(out)[0])
    with pytest.raises(TypeError, match="loss must be a scalar"):
        train(config, str(tmp_path / "b"), objective=lambda out: (out.student_logits, {}))


def test_sinkhorn_and_koleo_objective_is_the_sum_of_its_parts():
    from dino_jax.centering import sinkhorn_knopp
    from dino_jax.koleo import koleo_loss
    from dino_jax.loss import dino_cross_entropy

    out = outputs()
    config = tiny_config(**{"dino.centering": "sinkhorn", "dino.koleo_weight": 0.1})
    loss, metrics = objective_from_config(config.dino)(out)
    q = sinkhorn_knopp(out.teacher_logits, out.teacher_temp)
    dino = dino_cross_entropy(out.student_logits, q, student_temp=0.1)
    koleo = koleo_loss(out.student_features[0]) + koleo_loss(out.student_features[1])
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, dino + 0.1 * koleo, rtol=1e-6)
    np.testing.assert_allclose(metrics["train/koleo"], koleo, rtol=1e-6)
    # the EMA-centred target would be another loss
    ema, _ = objective_from_config(tiny_config().dino)(out)
    assert abs(float(ema) - float(dino)) > 1e-3


@pytest.mark.parametrize("chunks", [1, 8])
def test_sinkhorn_and_koleo_steps_on_8_devices_equal_1(chunks):
    config = tiny_config(
        **{"dino.centering": "sinkhorn", "dino.koleo_weight": 0.1, "dino.koleo_chunks": chunks}
    )
    runs = steps_on_meshes(config, 2)
    finals = {n: jax.device_get(run.final) for n, run in runs.items()}
    losses = {n: run.metrics for n, run in runs.items()}
    np.testing.assert_allclose(losses[8]["train/koleo"], losses[1]["train/koleo"], rtol=1e-5)
    np.testing.assert_allclose(losses[8]["train/loss"], losses[1]["train/loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(finals[8]), jax.tree.leaves(finals[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
