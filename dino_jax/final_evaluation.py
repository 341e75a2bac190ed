"""The record of a finished run: its final evaluation, written once, read by a restart."""

from __future__ import annotations

import json
import os

import jax

from dino_jax.checkpoint_storage import write_atomically

FINAL = "final_evaluation.json"  # written once the run has finished and been evaluated


def write_final(workdir: str, step: int, metrics: dict[str, float]) -> None:
    """Record that the run finished at `step` with these final metrics (process 0 writes); a
    storage failure raises CheckpointSaveError."""
    if jax.process_index() != 0:
        return
    write_atomically(
        os.path.join(workdir, FINAL),
        json.dumps({"step": step, "metrics": metrics}, indent=1),
        f"training finished and checkpoint {step} is complete: run the same command again to"
        " evaluate it and write this file",
    )


def read_final(workdir: str, step: int) -> dict[str, float] | None:
    """The final metrics of a run that finished at `step`, or None."""
    try:
        with open(os.path.join(workdir, FINAL)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record["metrics"] if record.get("step") == step else None
