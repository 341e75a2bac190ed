"""The training loop keeps train.steps_in_flight steps queued: the host waits only for older
steps, fetches metrics only at checks (logged steps, saves, evaluations, the end), and still
finds every non-finite step, from the device's count, before anything is saved."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.fault_helpers import finalised_steps, records
from helpers.states import assert_states_equal
from helpers.tiny import tiny_config
from jax._src import config as jax_config
from jax._src.array import ArrayImpl

from dino_jax import step_checks, trainer
from dino_jax.config import ConfigError
from dino_jax.step_checks import NonFiniteLossError, StepChecks
from dino_jax.trainer import initial_state, train
from dino_jax.validation import validate


class Logged:
    """MetricLogger's train() as the checks call it: (step, loss) of every step logged."""

    def __init__(self):
        self.lines = []

    def train(self, step, values, skips=None, now=None):
        self.lines.append((step, values["train/loss"]))


class NoCheckpoint:
    directory = "checkpoints"

    def wait(self):
        pass

    def latest_step(self):
        return None


def feed(checks: StepChecks, losses, skip_bad: bool = False) -> dict:
    """Dispatch one step per loss (device scalars, the non-finite count carried as the
    compiled step does), then the final check; returns the final check's metrics."""
    count = jnp.int32(0)
    for index, loss in enumerate(losses):
        metrics = {"train/loss": jnp.float32(loss), "train/grad_norm": jnp.float32(1.0)}
        if skip_bad:
            metrics["train/skipped"] = jnp.float32(not np.isfinite(loss))
        count = count + step_checks.nonfinite(metrics)
        checks.dispatched(index, metrics, count)
    return checks.check()


def make_checks(logger, in_flight=2, log_every=3, tolerated=0) -> StepChecks:
    return StepChecks(
        in_flight=in_flight,
        log_every=log_every,
        tolerated=tolerated,
        logger=logger,
        skips=None,
        ckpt=NoCheckpoint(),
    )


def test_host_fetches_logged_steps_once_seen_done_and_the_rest_at_the_end(monkeypatch):
    fetches = []
    fetch = step_checks._fetch
    monkeypatch.setattr(step_checks, "_fetch", lambda tree: fetches.append(tree) or fetch(tree))
    logger = Logged()
    final = feed(make_checks(logger, in_flight=2, log_every=3), [float(i) for i in range(10)])
    assert logger.lines == [(3, 2.0), (6, 5.0), (9, 8.0)]  # every logged step, in order
    assert len(fetches) == 3  # steps 2 and 5 once seen done, then the final check (8 and 9)
    assert final["train/loss"] == 9.0  # the final check brings the last step's metrics


def test_host_waits_for_the_step_in_flight_steps_back_never_the_last(monkeypatch):
    waited = []

    def wait(step):
        waited.append(step.index)
        step.seen_done = 0.0

    monkeypatch.setattr(StepChecks, "_wait", staticmethod(wait))
    checks = make_checks(Logged(), in_flight=3, log_every=100)
    for index in range(6):
        metrics = {"train/loss": jnp.float32(1.0), "train/grad_norm": jnp.float32(1.0)}
        checks.dispatched(index, metrics, jnp.int32(0))
        assert waited == list(range(index - 2))  # up to step index - 3: three in flight
    checks.check()
    assert waited == list(range(6))


def test_a_nan_between_checks_is_found_and_named(monkeypatch):
    logger = Logged()
    losses = [1.0, 1.0, 1.0, 1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 4 \(loss nan"):
        feed(make_checks(logger, in_flight=2, log_every=3), losses)
    assert logger.lines == [(3, 1.0)]  # logged before it; nothing from step 4 on


@pytest.mark.parametrize(
    ("bad", "raised_at"),
    [
        ([4, 5], None),  # two in a row, tolerated, across a check (index 5 is logged)
        ([1, 2, 4, 5, 7, 8], None),  # runs of two
        ([4, 5, 6], 6),  # the third in a row, checks between them
        ([2, 3, 4], 4),
    ],
)
def test_skipped_steps_in_a_row_are_counted_across_checks(bad, raised_at):
    losses = [float("nan") if i in bad else 1.0 for i in range(10)]
    checks = make_checks(Logged(), in_flight=2, log_every=3, tolerated=2)
    if raised_at is None:
        feed(checks, losses, skip_bad=True)
    else:
        with pytest.raises(NonFiniteLossError, match=f"non-finite loss at step {raised_at} "):
            feed(checks, losses, skip_bad=True)


@pytest.fixture
def guarded(monkeypatch):
    """The loop's per-step part may move nothing to the host, not even explicitly; the
    checks' fetches are counted.

    A CPU's arrays are host memory: JAX's runtime reads them without a copy and so without
    the device-to-host guard, which GPUs and TPUs apply. Here every host read of an array
    (float(), np.asarray, jax.device_get: all through ArrayImpl._value) obeys the guard."""
    monkeypatch.setattr(step_checks, "STEP_TRANSFER_GUARD", "disallow_explicit")
    value = ArrayImpl._value

    def guarded_value(self):
        if jax_config.transfer_guard_device_to_host.value == "disallow_explicit":
            raise RuntimeError(f"Disallowed device-to-host transfer: {self.aval}")
        return value.fget(self)

    monkeypatch.setattr(ArrayImpl, "_value", property(guarded_value))
    fetches = []
    fetch = step_checks._fetch
    monkeypatch.setattr(step_checks, "_fetch", lambda tree: fetches.append(1) or fetch(tree))
    return fetches


def logged_lines(workdir) -> list[dict]:
    drop = ("time", "perf/images_per_s")
    return [{k: v for k, v in r.items() if k not in drop} for r in records(workdir / "train.jsonl")]


def test_loop_transfers_only_at_checks_and_trains_as_one_step_in_flight(tmp_path, guarded):
    over = {"train.max_steps": 5, "train.log_every_steps": 2, "train.checkpoint_every_steps": 3}
    ahead = train(tiny_config(**over), str(tmp_path / "ahead"))
    assert ahead.status == "max_steps" and int(ahead.state.step) == 5
    # 5 steps, 2 fetches: the save after step 3 checks steps 1-3 (logged step 2 among them,
    # before it was seen done on its own) and the end steps 4-5
    assert len(guarded) == 2
    lines = records(tmp_path / "ahead" / "train.jsonl")
    assert [r["step"] for r in lines] == [2, 4]
    assert {"perf/images_per_s", "data/skipped_files", "train/loss"} <= set(lines[1])
    assert not any("nonfinite" in key for key in lines[1])
    assert finalised_steps(tmp_path / "ahead") == [3, 5]
    one = train(tiny_config(**over, **{"train.steps_in_flight": 1}), str(tmp_path / "one"))
    assert_states_equal(ahead.state, one.state)
    assert logged_lines(tmp_path / "ahead") == logged_lines(tmp_path / "one")
    assert ahead.metrics == one.metrics and "train/loss" in ahead.metrics


@pytest.mark.parametrize(
    "leak", [lambda m: float(m["train/loss"]), lambda m: jax.device_get(m["train/loss"])]
)
def test_a_host_transfer_every_step_is_refused(tmp_path, guarded, monkeypatch, leak):
    compile_loop_step = trainer.compile_loop_step

    def leaking(run):
        step = compile_loop_step(run)

        def leaky_step(*args):
            out = step(*args)
            leak(out[1])  # what a per-step log line or a loss check on the host would do
            return out

        return leaky_step

    monkeypatch.setattr(trainer, "compile_loop_step", leaking)
    with pytest.raises(Exception, match="isallowed device-to-host transfer"):
        train(tiny_config(**{"train.max_steps": 2}), str(tmp_path))


def test_a_nan_between_checks_stops_before_the_save(tmp_path, guarded, monkeypatch):
    def nan_center(run):  # the same program as a good run's: only the data is bad
        state = initial_state(run)
        nan = np.full(state.center.shape, np.nan, np.float32)
        return state.replace(center=jax.device_put(nan, state.center.sharding))

    monkeypatch.setattr(trainer, "initial_state", nan_center)
    # nothing logged and no save before the end: the device's count is all there is
    over = {"train.max_steps": 4, "train.log_every_steps": 10, "train.checkpoint_every_steps": 10}
    with pytest.raises(NonFiniteLossError) as err:
        train(tiny_config(**over), str(tmp_path))
    assert "non-finite loss at step 0" in str(err.value)
    assert "no checkpoint was written yet" in str(err.value)
    assert finalised_steps(tmp_path) == []
    assert len(guarded) == 2  # the final check: its count, then every step's metrics
    assert not (tmp_path / "train.jsonl").read_text()


@pytest.mark.parametrize("value", [0, -1])
def test_steps_in_flight_must_be_a_positive_int(value):
    config = tiny_config()
    config.train.steps_in_flight = value
    with pytest.raises(ConfigError, match=f"train.steps_in_flight={value}: must be an int >= 1"):
        validate(config, 1)
