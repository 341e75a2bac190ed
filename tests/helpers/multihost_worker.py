"""One process of a multi-process training run on CPU (see tests/test_multihost.py).

usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz [LATE_S [FLAT]]
Each process feeds its own rows of a fixed global batch; process 0 saves the final state.
With LATE_S, process 1 starts compiling that many seconds after the others (an unevenly
loaded host). With FLAT = 1 the run steps with optim.flat_state and saves the state taken
back per tensor.
"""

import os
import pathlib
import sys
import time

process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
late_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
flat = len(sys.argv) > 6 and sys.argv[6] == "1"
# the repository (for dino_jax) and tests/ (for helpers.*), found from this file's location
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from helpers.xla import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = xla_flags(8 // num_processes)

import jax  # noqa: E402
import numpy as np  # noqa: E402

if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes, process_id)

from dino_jax.data.pipeline import to_global  # noqa: E402
from dino_jax.trainer import build_run, compile_step, initial_state  # noqa: E402
from helpers.tiny import tiny_config  # noqa: E402

STEPS, BATCH = 3, 16


def global_batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        yield {
            "image": rng.integers(0, 256, (BATCH, 28, 28, 3), dtype=np.uint8),
            "size": rng.integers(16, 29, (BATCH, 2)).astype(np.int32),
            "label": np.zeros(BATCH, np.int32),
        }


run = build_run(tiny_config(**{"optim.batch_size": BATCH, "optim.flat_state": flat}))
assert run.mesh.size == 8 and jax.process_count() == num_processes
if process_id == 1:
    time.sleep(late_s)
state, step = run.to_step(initial_state(run)), compile_step(run)
rows = slice(process_id * BATCH // num_processes, (process_id + 1) * BATCH // num_processes)
for batch in global_batches():
    local = {key: value[rows] for key, value in batch.items()}
    state, metrics = step(state, to_global(local, run.mesh), jax.random.key(0))
leaves = jax.tree.leaves(run.to_tree(state))
if process_id == 0:
    # the state is replicated: every process holds all of it
    arrays = [np.asarray(x.addressable_shards[0].data) for x in leaves]
    np.savez(out, *arrays, loss=np.asarray(metrics["train/loss"].addressable_shards[0].data))
print("done", process_id, flush=True)
