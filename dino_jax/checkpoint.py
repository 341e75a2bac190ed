"""Orbax checkpoints of the whole train state and its config, what a resume may change, and
the errors that name a damaged, foreign or missing checkpoint with the way out. Orbax renames a
checkpoint into place only when complete: a killed run never sees a partial one."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

_LOG = logging.getLogger(__name__)
HISTORY = "checkpoints.jsonl"  # every checkpoint known complete: saved or restored from

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
    "model.attention",
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
            self.directory,
            options=options,
            item_names=("state", "meta"),
            # Declared up front so that the stored shapes can be read without restoring.
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._writing: int | None = None  # the step of an asynchronous save not yet known done
        # Outside checkpoints/, so that it outlives them: see check_work_dir.
        self.history = os.path.join(os.path.abspath(workdir), HISTORY)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, meta: dict[str, Any], *, force: bool = False) -> bool:
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return False
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )
        if saved:
            self._settle()  # orbax finished the previous save before starting this one
            self._writing = step
        return saved

    def _settle(self) -> None:
        if self._writing is not None and os.path.isdir(self.step_path(self._writing)):
            self.record(self._writing, "saved")
        self._writing = None

    def record(self, step: int, event: str) -> None:
        """Append to the history a checkpoint known complete ("saved" or "restored")."""
        if jax.process_index() == 0:
            with open(self.history, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "event": event, "time": time.time()}) + "\n")

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def damaged(self, step: int, why: str) -> CheckpointError:
        """The error for an unreadable checkpoint: what is wrong and how to fall back."""
        earlier = [s for s in self.manager.all_steps() if s < step]
        path = self.step_path(step)
        aside = os.path.join(os.path.dirname(self.directory), f"damaged-checkpoint-{step}")
        if earlier:
            way_out = (
                f"Move it aside (mv {path} {aside}) to resume from the previous checkpoint,"
                f" step {max(earlier)}."
            )
        else:
            way_out = (
                "No earlier checkpoint is left: use a new work directory, or move it and"
                f" {HISTORY} aside to train from scratch here."
            )
        return CheckpointError(f"checkpoint {step} at {path} is damaged: {why}\n{way_out}")

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(meta.meta)
        except Exception as err:  # missing or unparsable item: orbax raises several types
            raise self.damaged(step, f"its metadata cannot be read ({_brief(err)})") from err
        if not isinstance(meta.get("config"), dict):
            raise self.damaged(step, "its metadata holds no config (not written by dino_jax?)")
        return meta

    def restore(self, step: int, abstract_state):
        """The state of checkpoint `step`, laid out like `abstract_state` (shapes and
        shardings), so nothing has to be resharded afterwards."""
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)),
            )
        except Exception as err:  # orbax raises many types for damaged or foreign trees
            differences = self._model_differences(step, abstract_state)
            if differences:
                shown = "\n".join(f"  {d}" for d in differences[:8])
                raise CheckpointError(
                    f"checkpoint {step} at {self.step_path(step)} was written for a different"
                    f" model: {len(differences)} arrays differ:\n{shown}\nResume with the"
                    " config it was written with, or start a new work directory."
                ) from err
            raise self.damaged(step, f"its arrays cannot be read ({_brief(err)})") from err
        return restored.state

    def _model_differences(self, step: int, abstract_state) -> list[str]:
        """How the arrays stored in checkpoint `step` differ from the model's, by name."""
        try:
            stored = _array_specs(self.manager.item_metadata(step)["state"])
        except Exception:  # unreadable tree metadata: damage, reported by the caller
            return []
        if not stored:  # no tree metadata left at all: damage too
            return []
        wanted = _array_specs(abstract_state)
        out = [f"{k}: in the checkpoint only" for k in sorted(set(stored) - set(wanted))]
        out += [f"{k}: missing from the checkpoint" for k in sorted(set(wanted) - set(stored))]
        for k in sorted(set(stored) & set(wanted)):
            if stored[k] != wanted[k]:
                out.append(f"{k}: checkpoint {stored[k]} -> this model {wanted[k]}")
        return out

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._settle()

    def close(self) -> None:
        self.manager.close()


def _array_specs(tree) -> dict[str, tuple]:
    """Array name ("opt_state.1.mu.head.last_layer.kernel") -> (shape, dtype name)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        jax.tree_util.keystr(p, simple=True, separator="."): (tuple(x.shape), str(x.dtype))
        for p, x in leaves
    }


def _brief(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:300] + "..."


def logged_checkpoint(workdir: str) -> int | None:
    """The newest checkpoint step that `<workdir>/checkpoints.jsonl` records as complete on
    disk (saved, or restored from). Lines that do not parse (a write cut short) are passed over."""
    path = os.path.join(workdir, HISTORY)
    if not os.path.exists(path):
        return None
    newest = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(step, int):
                newest = step if newest is None else max(newest, step)
    return newest


def check_work_dir(workdir: str, latest: int | None) -> None:
    """Refuse to train from scratch over a run whose checkpoints are gone; warn when the run
    falls back to an older checkpoint than the history records."""
    logged = logged_checkpoint(workdir)
    if logged is None:
        return
    where = os.path.join(os.path.abspath(workdir), "checkpoints")
    if latest is None:
        raise CheckpointError(
            f"{os.path.join(workdir, HISTORY)} records checkpoint {logged}, but {where} holds"
            " none: the checkpoints were deleted or moved, or this is the wrong work directory."
            f" Put them back to resume; to train from scratch, use a new work directory (or"
            f" move {HISTORY} aside)."
        )
    if latest < logged:
        _LOG.warning(
            "resuming from step %d, but checkpoint %d, recorded in %s, is gone (moved aside?):"
            " steps %d..%d are trained again",
            latest,
            logged,
            HISTORY,
            latest,
            logged,
        )
