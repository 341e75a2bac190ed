"""Without TensorFlow installed, the demo, evaluation on the bundled data, attention maps,
official weights and the step benchmark run, and nothing of ours tries to import it; the
sources that need it stop before any work and name the extra to install."""

import os
import pathlib
import subprocess
import sys

from helpers.xla import xla_flags

HELPER = pathlib.Path(__file__).resolve().parent / "helpers" / "without_tensorflow.py"


def test_demo_paths_run_with_tensorflow_unimportable(tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags(8)}
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(HELPER), str(workdir)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    out, err = result.stdout, result.stderr
    assert result.returncode == 0, out[-3000:] + err[-3000:]
    assert "TRAINED_AND_EVALUATED" in out and "DONE" in out, out[-3000:]
    assert "IMPORTED" not in out, out  # no module of ours asked for TensorFlow
    assert "LOADED []" in out, out  # and nothing else loaded it
    assert "FOLDER_EXIT 2" in out
    assert "data.source='folder' needs tensorflow" in err and "dino_jax[tfds]" in err, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
