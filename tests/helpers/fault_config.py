"""The tiny test configuration as a recipe file for train.py
(`--config=tests/helpers/fault_config.py`), and a runner for train.py with it."""

import os
import pathlib
import subprocess
import sys

# the repository (for dino_jax) and tests/ (for helpers.*), found from this file's location
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from helpers.tiny import tiny_config
from helpers.xla import xla_flags


def get_config():
    return tiny_config()


def train_py(workdir, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python train.py --config=<this file> --workdir=<workdir> *args` on 8 CPU devices."""
    here = pathlib.Path(__file__).resolve()
    root = here.parents[2]
    env = {**os.environ, "XLA_FLAGS": xla_flags(8)}
    cmd = [sys.executable, str(root / "train.py"), f"--config={here}", f"--workdir={workdir}"]
    cmd += args
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
