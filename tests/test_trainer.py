"""The training loop: sharding, compilation, resume and preemption (tiny config, CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest
from helpers.states import assert_states_equal, steps_on_meshes
from helpers.tiny import tiny_config
from helpers.xla import xla_flags

from dino_jax import parallel
from dino_jax.data.pipeline import to_global
from dino_jax.trainer import build_run, compile_step, initial_state, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharded_step_equals_single_device_and_compiles_once():
    config = tiny_config()
    runs = steps_on_meshes(config, 3)
    for run in runs.values():
        assert run.step._cache_size() == 1  # one compilation for every step
    finals = {n: run.final for n, run in runs.items()}
    student = finals[8].student["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert len(student.sharding.device_set) == 8
    assert_states_equal(finals[8], finals[1], rtol=1e-5, atol=1e-6)


def test_resume_equals_uninterrupted(tmp_path):
    straight = train(tiny_config(**{"train.max_steps": 7}), str(tmp_path / "a"))
    first = train(tiny_config(**{"train.max_steps": 4}), str(tmp_path / "b"))
    assert first.status == "max_steps" and int(first.state.step) == 4
    resumed = train(tiny_config(**{"train.max_steps": 7}), str(tmp_path / "b"))
    assert int(resumed.state.step) == 7
    assert_states_equal(straight.state, resumed.state)


def test_second_run_resumes_instead_of_restarting(tmp_path):
    config = tiny_config(**{"train.max_steps": 3})
    train(config, str(tmp_path))
    again = train(config, str(tmp_path))
    assert int(again.state.step) == 3
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # nothing trained twice


WORKER = """
import sys
sys.path.insert(0, {tests!r})
from helpers.tiny import tiny_config
from dino_jax.trainer import train
config = tiny_config(**{{"train.max_steps": {steps}, "train.checkpoint_every_steps": 5}})
result = train(config, {workdir!r})
print("STATUS", result.status, int(result.state.step), flush=True)
"""


def launch(workdir, steps):
    code = WORKER.format(tests=os.path.join(ROOT, "tests"), steps=steps, workdir=str(workdir))
    env = {**os.environ, "XLA_FLAGS": xla_flags(8)}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )


def wait_for_checkpoint(workdir, proc, min_step=5, timeout=240):
    start = time.time()
    ckpts = os.path.join(workdir, "checkpoints")
    while time.time() - start < timeout:
        done = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
        if any(s >= min_step for s in done):
            return
        assert proc.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_resumes_to_the_same_state(tmp_path, sig):
    total = 400
    proc = launch(tmp_path / "run", total)
    wait_for_checkpoint(tmp_path / "run", proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 0, out  # preemption: save and exit cleanly
        assert "STATUS preempted" in out
    else:
        assert proc.returncode == -signal.SIGKILL
    stopped = max(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
    assert stopped < total
    config = tiny_config(**{"train.max_steps": stopped + 4})
    resumed = train(config, str(tmp_path / "run"))
    straight = train(config, str(tmp_path / "straight"))
    assert int(resumed.state.step) == stopped + 4
    assert_states_equal(straight.state, resumed.state)


def test_fsdp_shards_the_state_and_trains_as_the_replicated_step(tmp_path):
    # out_dim 2048: the head's last layer (16 x 2048) and its Adam moments pass the size floor
    config = {
        fsdp: tiny_config(**{"model.out_dim": 2048, "train.fsdp": fsdp}) for fsdp in (True, False)
    }
    runs = {fsdp: build_run(c, mesh=parallel.make_mesh()) for fsdp, c in config.items()}
    batches = [b for _, b in zip(range(3), iter(runs[True].data), strict=False)]
    finals = {}
    for fsdp, run in runs.items():
        state, step = initial_state(run), compile_step(run)
        for batch in batches:
            state, _ = step(state, to_global(batch, run.mesh), jax.random.key(0))
        finals[fsdp] = state

    def shard_rows(x):
        return {s.data.shape for s in x.addressable_shards}

    sharded = finals[True]
    last = sharded.student["head"]["last_layer"]["weight_v"]
    assert last.shape == (16, 2048) and shard_rows(last) == {(16, 256)}
    assert shard_rows(sharded.teacher["head"]["last_layer"]["weight_v"]) == {(16, 256)}
    assert shard_rows(sharded.opt_state[1].mu["head"]["last_layer"]["weight_v"]) == {(16, 256)}
    assert shard_rows(finals[False].student["head"]["last_layer"]["weight_v"]) == {(16, 2048)}
    assert_states_equal(finals[True], finals[False], rtol=1e-5, atol=1e-6)

    # checkpoints written from the sharded state resume into the same layout
    fsdp_config = config[True]
    fsdp_config.train.max_steps = 3
    train(fsdp_config, str(tmp_path))
    fsdp_config.train.max_steps = 4
    resumed = train(fsdp_config, str(tmp_path))
    assert int(resumed.state.step) == 4
    assert shard_rows(resumed.state.student["head"]["last_layer"]["weight_v"]) == {(16, 256)}
