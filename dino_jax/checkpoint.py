"""Orbax checkpoints of the train state, and what a resume may and may not change.

Each checkpoint holds the whole state (step, student, teacher, optimiser moments, center)
and a JSON record of the config it was written under. Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-write never sees a partial
checkpoint: restore takes the latest finalised step.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

# Config keys a resumed run may change freely: they do not touch shapes or the recipe's
# meaning for steps already taken (logging, checkpoint cadence, evaluation, data plumbing).
FREE_PREFIXES = (
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.max_steps",
    "train.progress_bar",
    "train.allow_config_change",
    "train.skip_nonfinite_steps",
    "eval.",
    "data.num_parallel_calls",
    "data.prefetch",
    "data.data_dir",
    "data.manual_dir",
    "model.attention",
    "init_from",
)
# Changed only with train.allow_config_change: the recipe's length and rates.
OVERRIDABLE_PREFIXES = ("optim.epochs", "optim.lr", "optim.min_lr", "optim.weight_decay")


class CheckpointError(RuntimeError):
    """A work directory whose checkpoints cannot be resumed as asked."""


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def visit(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, (dict, ml_collections.ConfigDict)):
                visit(value, name + ".")
            else:
                flat[name] = list(value) if isinstance(value, tuple) else value

    visit(config.to_dict(), "")
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple]:
    """(key, saved value, current value) for every key that differs."""
    keys = sorted(set(saved) | set(current))
    missing = object()
    diffs = []
    for key in keys:
        a, b = saved.get(key, missing), current.get(key, missing)
        if a != b:
            diffs.append((key, None if a is missing else a, None if b is missing else b))
    return diffs


def check_resume_config(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[tuple]:
    """Refuse a resume whose config changes shapes or the recipe; return allowed changes."""
    diffs = config_differences(saved, flatten_config(config))
    allow = config.train.allow_config_change
    refused = [
        d
        for d in diffs
        if not d[0].startswith(FREE_PREFIXES)
        and not (allow and d[0].startswith(OVERRIDABLE_PREFIXES))
    ]
    if refused:
        lines = "\n".join(f"  {k}: checkpoint {a!r} -> now {b!r}" for k, a, b in refused)
        hint = (
            "Resume with the original values, or start a new work directory."
            " (optim.epochs/lr/min_lr/weight_decay may change with"
            " --config.train.allow_config_change=True.)"
        )
        raise CheckpointError(
            f"the config differs from the one the checkpoints were written with:\n{lines}\n{hint}"
        )
    return diffs


class Checkpointer:
    """Periodic and final saves of the train state under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int, asynchronous: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=asynchronous,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, meta: dict[str, Any], *, force: bool = False) -> bool:
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(meta.meta)
        except Exception as err:  # missing or unparsable item: orbax raises several types
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} has no readable metadata ({err}); it"
                " is damaged or not written by dino_jax: move it away to resume from an earlier"
                " one"
            ) from err

    def restore(self, step: int, abstract_state):
        """The state of checkpoint `step`, laid out like `abstract_state` (shapes and
        shardings), so nothing has to be resharded afterwards."""
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)),
            )
        except Exception as err:  # orbax raises many types for damaged or foreign trees
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} cannot be restored into this model:"
                f" {type(err).__name__}: {err}"
            ) from err
        return restored.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
