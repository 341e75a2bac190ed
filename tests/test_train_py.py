"""`python train.py` end to end: quiet logs, and the same command run twice resumes."""

import json
import logging

from helpers.fault_config import train_py

from dino_jax import cli


def test_same_command_twice_resumes_and_checkpoint_internals_stay_quiet(tmp_path):
    args = ("--config.train.max_steps=3", "--config.train.progress_bar=False")
    first = train_py(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "max_steps at step 3" in first.stderr
    orbax_info = [
        line
        for line in first.stderr.splitlines()
        if line.startswith("I") and ("checkpoint_manager.py:" in line or "atomicity.py:" in line)
    ]
    assert not orbax_info, orbax_info[:3]
    second = train_py(tmp_path, *args)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from step 3" in second.stderr and "max_steps at step 3" in second.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "train.jsonl").open()]
    assert steps == sorted(set(steps))  # the second run trained nothing again


def test_only_orbax_info_is_filtered():
    def record(level, path):
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert cli.below_warning_from_orbax(record(logging.INFO, orbax))
    assert not cli.below_warning_from_orbax(record(logging.WARNING, orbax))
    assert not cli.below_warning_from_orbax(record(logging.INFO, "/repo/dino_jax/trainer.py"))
