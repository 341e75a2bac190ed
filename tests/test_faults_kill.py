"""kill -9 at seeded random moments, mid-checkpoint-write too, and SIGTERM: every restart resumes
from the last complete checkpoint and the run ends exactly where an uninterrupted one does."""

import random
import signal
import time

import pytest
from helpers.fault_helpers import (
    Worker,
    finalised_steps,
    history,
    logged,
    restore,
    temporary_checkpoints,
)
from helpers.states import assert_states_equal

EVERY = 5  # checkpoint interval: many saves, so many kills land in or near one


def settings(total: int, every: int = EVERY) -> dict:
    # 4 epochs of 125 steps: the longest variant stops at max_steps, not at the end of training
    return {"train.max_steps": total, "train.checkpoint_every_steps": every, "optim.epochs": 4}


def wait_until(predicate, timeout: float = 180, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def restart(run_dir, total: int, tally, every: int = EVERY, **kw) -> tuple[Worker, int]:
    """Start the run again; it must resume from the newest complete checkpoint."""
    complete = finalised_steps(run_dir)
    worker = Worker(run_dir, settings(total, every), **kw)
    start = int(worker.wait_for("START"))
    expected = complete[-1] if complete else 0
    tally.restart(start)
    tally.lost(max(0, expected - start))
    assert start == expected, f"resumed from {start}, the last complete checkpoint is {expected}"
    return worker, start


def losses_logged(run_dir) -> int:
    return len(logged(run_dir, "train/loss"))  # one every log_every_steps = 2 steps


def kill_and_resume(tmp_path, tally, kills: int, seed: int) -> None:
    """Kills cycle through three kinds of moment: after a random number of steps; during a
    checkpoint write (every commit waits 1 s before its rename, and the kill comes at a random
    moment after the temporary directory appears); at a random time after start-up, which
    often lands in compilation."""
    rng = random.Random(seed)
    total = 30 * kills + 20  # each start gains < 30 steps before its kill
    run_dir = tmp_path / "killed"
    for i in range(kills):
        moment = ("steps", "mid-write", "time")[i % 3]
        with tally.fault():
            delay = 1.0 if moment == "mid-write" else 0.0
            worker, start = restart(run_dir, total, tally, save_delay=delay)
            if moment == "steps":
                target = losses_logged(run_dir) + rng.randint(3, 11)  # 6 to 22 steps
                wait_until(lambda t=target: losses_logged(run_dir) >= t, what="training steps")
                time.sleep(rng.uniform(0.0, 0.1))
            elif moment == "mid-write":
                wait_until(lambda: temporary_checkpoints(run_dir), what="a checkpoint write")
                time.sleep(rng.uniform(0.0, 1.0))
            else:
                time.sleep(rng.uniform(0.2, 4.0))
            assert worker.running(), "the run ended before the kill: raise `total`"
            worker.proc.kill()
            assert worker.finish() == -signal.SIGKILL
            if moment == "mid-write":
                partial = temporary_checkpoints(run_dir)
                assert partial, "the kill missed the checkpoint write"
                assert all(int(name.split(".")[0]) > start for name in partial)
    # The last start runs to the end; fewer saves make it faster and change nothing else.
    worker, _ = restart(run_dir, total, tally, every=total)
    assert worker.finish() == 0 and worker.value("STATUS") == f"max_steps {total}"
    straight = Worker(tmp_path / "straight", settings(total, every=total))
    assert straight.finish() == 0, straight.tail()
    assert_states_equal(
        restore(run_dir, total, **settings(total)),
        restore(tmp_path / "straight", total, **settings(total)),
    )


def test_kill_9_at_random_moments_and_mid_write_resumes_exactly(tmp_path, tally):
    kill_and_resume(tmp_path, tally, kills=4, seed=0)


@pytest.mark.slow
def test_kill_9_twelve_times_resumes_exactly(tmp_path, tally):
    kill_and_resume(tmp_path, tally, kills=12, seed=1)


@pytest.mark.parametrize("moment", ["training", "starting"])
def test_sigterm_saves_in_bounded_time_exits_0_and_resumes(tmp_path, tally, moment):
    run_dir = tmp_path / "run"
    with tally.fault():
        worker = Worker(run_dir, {"train.max_steps": 5000, "train.checkpoint_every_steps": 1000})
        worker.wait_for("START")
        if moment == "training":
            wait_until(lambda: any(s >= 10 for s, _ in logged(run_dir, "train/loss")))
        sent = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.finish() == 0, worker.tail()
        elapsed = time.monotonic() - sent
        status, step = worker.value("STATUS").split()
        step = int(step)
        assert status == "preempted"
        tally.figure(f"SIGTERM while {moment}: checkpoint (if any) and exit (s)", elapsed)
        assert elapsed < 60
        if step == 0:  # the signal came before the first step: nothing new to save
            assert moment == "starting" and finalised_steps(run_dir) == []
            return
        assert finalised_steps(run_dir) == [step]  # written by the SIGTERM, complete
        assert history(run_dir)[-1] == ("saved", step)
        resumed = Worker(run_dir, {"train.max_steps": step + 2})
        start = int(resumed.wait_for("START"))
        tally.restart(start)
        assert start == step
        assert resumed.finish() == 0 and resumed.value("STATUS") == f"max_steps {step + 2}"
