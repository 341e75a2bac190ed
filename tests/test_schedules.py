"""Schedules against the official arrays (schedules.npz, train_steps.npz), in float64."""

import jax
import numpy as np
import pytest
from helpers import parity

from dino_jax.schedules import cosine_schedule, warmup_constant_schedule


def _eval(fn, n):
    with jax.enable_x64(True):
        return np.asarray([fn(i) for i in range(n)], np.float64)


def test_cosine_schedules_match_official(fixtures_dir):
    data = np.load(fixtures_dir / "schedules.npz")
    cases = {
        "out/lr": dict(base=0.002, final=1e-6, total_steps=30, warmup_steps=10),
        "out/wd": dict(base=0.04, final=0.4, total_steps=30),
        "out/momentum": dict(base=0.996, final=1.0, total_steps=30),
    }
    for key, kw in cases.items():
        ours = _eval(lambda i, kw=kw: cosine_schedule(i, **kw), 30)
        np.testing.assert_allclose(ours, data[key], rtol=1e-12, atol=0, err_msg=key)


def test_teacher_temperature_matches_official(fixtures_dir):
    data = np.load(fixtures_dir / "schedules.npz")
    ours = _eval(lambda e: warmup_constant_schedule(e, start=0.04, value=0.07, warmup_epochs=3), 10)
    np.testing.assert_allclose(ours, data["out/teacher_temp"], rtol=1e-12, atol=0)


@pytest.fixture
def train_steps_schedules():
    return parity.train_steps_schedules()


def test_bound_schedules_match_training_run(fixtures_dir, train_steps_schedules):
    data = np.load(fixtures_dir / "train_steps.npz")
    sch = train_steps_schedules
    for name, fn in [("lr", sch.lr), ("wd", sch.wd), ("momentum", sch.momentum)]:
        ref = data[f"out/{name}_schedule"]
        np.testing.assert_allclose(_eval(fn, len(ref)), ref, rtol=1e-12, err_msg=name)
    temps = _eval(sch.teacher_temp_at, 20)[::2]  # one value per epoch of 2 steps
    np.testing.assert_allclose(temps, data["out/teacher_temp_schedule"], rtol=1e-12)
    for s in range(4):
        assert bool(sch.last_layer_frozen(s)) == (s < 2)
        np.testing.assert_allclose(
            _eval(sch.teacher_temp_at, 4)[s], data[f"out/step{s}/teacher_temp"]
        )


def test_schedules_hold_last_value_past_the_end(train_steps_schedules):
    sch = train_steps_schedules
    assert float(sch.lr(10_000)) == pytest.approx(float(sch.lr(sch.total_steps - 1)))
    assert float(sch.momentum(10_000)) == float(sch.momentum(sch.total_steps - 1))


def test_schedules_run_under_jit(train_steps_schedules):
    sch = train_steps_schedules
    jitted = jax.jit(lambda s: (sch.lr(s), sch.wd(s), sch.momentum(s), sch.teacher_temp_at(s)))
    for s in (0, 3, 7, 19):
        np.testing.assert_allclose(
            jitted(s), (sch.lr(s), sch.wd(s), sch.momentum(s), sch.teacher_temp_at(s)), rtol=1e-6
        )
