"""Modules the tests share; none of them is a test (tests/ is on sys.path under pytest, so they
are imported as `helpers.<module>`).

- tiny: the tiny configuration for fast end-to-end tests, and small data configs
- states: comparison of training states (TrainState pytrees), exact or within tolerances
- parity: fixture loading and error measures for the parity tests
- localhost: a free TCP port for the coordinator of jax.distributed test processes
- fault_helpers: worker processes, checkpoint listings and logs for the fault-injection tests
- fault_tally: the pytest plugin behind the `tally` fixture and the fault summary line
- fault_config: the tiny config as a train.py recipe file, and a train.py runner

Run as scripts in subprocesses (by path; they put tests/ and the repository on sys.path):

- fault_worker: a training process for the fault tests to kill
- multihost_worker: one process of a multi-process training run on CPU
"""
