"""The config keys a resumed run may change, and CheckpointError, which refuses a resume."""

from __future__ import annotations

from typing import Any

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
    "linear.",
    "data.num_parallel_calls",
    "data.prefetch",
    "data.data_dir",
    "data.manual_dir",
    "model.attention",  # and model.attention_pad: the same attention, another kernel
    "model.remat",  # recomputes activations, the same values
    "aug.window",  # the same crops from less of the canvas
    "optim.branch_updates",  # the same values, another program
    "optim.wait_for_gradient",  # the same values, another program
    "optim.flat_state",  # the same values, another layout while stepping
    "dino.loss_chunks",  # the same loss, its logits made in chunks
    "train.steps_in_flight",
    "train.compilation_cache",
    "init_from",
)
# Changed only with train.allow_config_change: the recipe's length and rates.
OVERRIDABLE_PREFIXES = ("optim.epochs", "optim.lr", "optim.min_lr", "optim.weight_decay")


class CheckpointError(RuntimeError):
    """A work directory whose checkpoints cannot be resumed as asked."""


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


def check_resume_config(
    saved: dict[str, Any], current: dict[str, Any], allow: bool = False
) -> list[tuple]:
    """Refuse a resume whose (flattened) config changes shapes or the recipe; return the
    allowed changes. `allow`: train.allow_config_change."""
    diffs = config_differences(saved, current)
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
