"""Two processes (jax.distributed on localhost, 4 CPU devices each) train like one process,
even when one of them reaches the first step much later than the other."""

import os
import subprocess
import sys

import numpy as np
from helpers.localhost import free_port

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
WORKER = os.path.join(TESTS, "helpers", "multihost_worker.py")


# CPU collectives (gloo) give up on peers more than 30 s apart at their first collective;
# trainer.build_run connects the processes before anything slow happens
LATE_S = 35


def launch(num_processes: int, out, late_s: float = 0.0, flat: bool = False) -> None:
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": ROOT}
    args = [str(num_processes), port, str(out), str(late_s), "1" if flat else "0"]
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(i), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]


def assert_same_run(a, b) -> None:
    assert sorted(a.files) == sorted(b.files) and len(b.files) > 50
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    for key in b.files:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_two_processes_match_one(tmp_path):
    """Also with optim.flat_state over the two processes (its conversions read the replicated
    state on each), against the one process's per-tensor run."""
    launch(2, tmp_path / "two.npz", late_s=LATE_S)
    launch(1, tmp_path / "one.npz")
    launch(2, tmp_path / "flat.npz", flat=True)
    one = np.load(tmp_path / "one.npz")
    assert_same_run(np.load(tmp_path / "two.npz"), one)
    assert_same_run(np.load(tmp_path / "flat.npz"), one)
