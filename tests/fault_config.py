"""The tiny test configuration as a recipe file for train.py: `--config=tests/fault_config.py`,
and a runner for train.py with it."""

import os
import pathlib
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny import tiny_config


def get_config():
    return tiny_config()


def train_py(workdir, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python train.py --config=<this file> --workdir=<workdir> *args` on 8 CPU devices."""
    tests = pathlib.Path(__file__).resolve().parent
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    cmd = [sys.executable, str(tests.parent / "train.py"), f"--config={tests / 'fault_config.py'}"]
    cmd += [f"--workdir={workdir}", *args]
    return subprocess.run(
        cmd, cwd=tests.parent, env=env, capture_output=True, text=True, timeout=timeout
    )
