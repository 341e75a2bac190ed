"""Shared by the fault-injection tests: worker processes, checkpoint listings, logged records
(states are compared with helpers.states)."""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp

from dino_jax import train_step as train_step_module
from dino_jax.checkpoint import Checkpointer
from dino_jax.trainer import build_run
from helpers.tiny import tiny_config
from helpers.xla import xla_flags

TESTS = pathlib.Path(__file__).resolve().parent.parent  # tests/
ROOT = TESTS.parent
HELPERS = TESTS / "helpers"


class Worker:
    """helpers/fault_worker.py in a subprocess; its stdout lines are collected as they come."""

    def __init__(self, workdir, overrides: dict, *, save_delay: float = 0.0, log=None):
        cmd = [sys.executable, str(HELPERS / "fault_worker.py"), str(workdir)]
        cmd += ["--overrides", json.dumps(overrides), "--save-delay", str(save_delay)]
        env = {
            **os.environ,
            "XLA_FLAGS": xla_flags(8),
            "PYTHONPATH": str(ROOT),
        }
        self.log = pathlib.Path(log or f"{workdir}.stderr")
        with open(self.log, "a") as stderr:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def value(self, prefix: str) -> str | None:
        """The rest of the first stdout line starting with `prefix`, if printed yet."""
        return next((x[len(prefix) :].strip() for x in self.lines if x.startswith(prefix)), None)

    def wait_for(self, prefix: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (found := self.value(prefix)) is not None:
                return found
            if self.proc.poll() is not None:
                self._reader.join(5)
                if (found := self.value(prefix)) is not None:
                    return found
                raise AssertionError(f"worker exited ({self.proc.returncode}): {self.tail()}")
            time.sleep(0.02)
        raise AssertionError(f"no {prefix!r} line within {timeout} s: {self.tail()}")

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = 240) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""


def finalised_steps(workdir) -> list[int]:
    """Steps of the complete checkpoints (Orbax renames a checkpoint to its step when done)."""
    path = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []


def temporary_checkpoints(workdir) -> list[str]:
    path = pathlib.Path(workdir) / "checkpoints"
    return (
        [p.name for p in path.iterdir() if "orbax-checkpoint-tmp" in p.name]
        if path.is_dir()
        else []
    )


def restore(workdir, step: int, **overrides):
    """The state of checkpoint `step` of a tiny-config run, as host arrays."""
    run = build_run(tiny_config(**overrides))
    abstract = run.restore_target
    ckpt = Checkpointer(str(workdir), keep=3)
    try:
        return jax.device_get(ckpt.restore(step, abstract))
    finally:
        ckpt.close()


def records(path) -> list[dict]:
    """The JSON lines of `path`; a line cut short by a kill (or being written) is passed over."""
    path = pathlib.Path(path)
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def logged(workdir, key: str) -> list[tuple[int, float]]:
    """(step, value) of every train.jsonl record that has `key`."""
    return [(r["step"], r[key]) for r in records(pathlib.Path(workdir) / "train.jsonl") if key in r]


def history(workdir) -> list[tuple[str, int]]:
    """(event, step) of every line of the work directory's checkpoints.jsonl."""
    return [(r["event"], r["step"]) for r in records(pathlib.Path(workdir) / "checkpoints.jsonl")]


def poison(monkeypatch, steps, *, where: str = "input") -> None:
    """NaN in the crops of the given steps (a NaN batch), or in the update's result only."""
    update = train_step_module.dino_update
    bad_steps = jnp.asarray(steps)

    def poisoned(state, crops, key, hp, *rest, **options):  # rest: iBOT's masks
        bad = jnp.isin(state.step, bad_steps)
        if where == "input":
            crops = tuple(jnp.where(bad, jnp.nan, c) for c in crops)
            return update(state, crops, key, hp, *rest, **options)
        new_state, metrics = update(state, crops, key, hp, *rest, **options)
        student = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), new_state.student)
        return new_state.replace(student=student), metrics

    monkeypatch.setattr(train_step_module, "dino_update", poisoned)
