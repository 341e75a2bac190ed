"""Orbax checkpoints of the whole train state and its config: saves, verified restores, history.

Orbax renames a checkpoint into place only when complete: a killed run never sees a partial
one. Each checkpoint also records a digest of every array (see checkpoint_digests), and a restore
compares the arrays it read with them: Orbax checks its tree files but not the array data, so
without this a flipped bit in a data file would be resumed from silently. A save that the
storage fails (disk full, I/O error) raises CheckpointSaveError, which names that save and the
last complete checkpoint, and removes what the failed save left."""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from dino_jax.checkpoint_digests import (
    array_digests,
    digest_mismatches,
    digest_record,
    recorded_digests,
)
from dino_jax.checkpoint_orbax import _quiet_orbax_storage_failures, _settle_orbax_threads
from dino_jax.checkpoint_resume import CheckpointError
from dino_jax.checkpoint_storage import (
    CheckpointSaveError,
    _brief,
    _remove_quietly,
    append_line,
    newest_complete_checkpoint,
    save_failure_message,
    storage_failure,
)

_LOG = logging.getLogger(__name__)
HISTORY = "checkpoints.jsonl"  # every checkpoint known complete: saved or restored from


class Checkpointer:
    """Periodic and final saves of the train state under `<workdir>/checkpoints`, with the
    digests of its arrays; restores that verify them."""

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
        _quiet_orbax_storage_failures()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Start saving `state` (asynchronously) with `meta` and the digests of its arrays.
        The previous save is waited for first: if the storage failed it, CheckpointSaveError
        names that save, not this one."""
        step = int(jax.device_get(state.step))
        self._settle()
        if step in self.manager.all_steps():
            return False
        meta = {**meta, **digest_record(state)}
        failure = None
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=force,
            )
        except Exception as err:
            failure = self._save_failed(step, err)
            if failure is None:
                raise
        if failure is not None:  # raised here, without Orbax's error (and its threads) attached
            raise failure
        if saved:
            self._writing = step
        return saved

    def wait(self) -> None:
        """Block until the save in flight is on disk and recorded; CheckpointSaveError if the
        storage failed it."""
        self._settle()

    def _settle(self) -> None:
        step, self._writing = self._writing, None
        if step is None:
            return
        failure = None
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            failure = self._save_failed(step, err)
            if failure is None:
                raise
        if failure is not None:
            raise failure
        if os.path.isdir(self.step_path(step)):
            self.record(step, "saved")

    def _save_failed(self, step: int, err: Exception) -> CheckpointSaveError | None:
        """The error for the save of `step` that `err` ended, once what it wrote is removed;
        None when `err` is not a storage failure (a bug: it is raised as it is)."""
        why = storage_failure(err)
        if why is None:
            return None
        _settle_orbax_threads(timeout=30.0)
        # The work it cancelled was never started: Python would warn of each such coroutine
        # at exit, after the message. Set only once a save failed, so nothing else is hidden.
        warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
        if jax.process_index() == 0:
            self._remove_written(step, patience=10.0)
        last = newest_complete_checkpoint(self.directory, but=step)
        return CheckpointSaveError(save_failure_message(step, self.directory, why, last))

    def _remove_written(self, step: int, patience: float) -> None:
        """Remove what the failed save of `step` wrote. The storage library may still finish
        writes it had started (each failing soon): the removal is repeated until the files
        stay gone for a moment, for at most `patience` seconds. (What might still come back
        is a temporary directory, which Orbax deletes at the next start.)"""
        deadline = time.monotonic() + patience
        while True:
            pattern = os.path.join(glob.escape(self.directory), f"{step}.orbax-checkpoint-tmp*")
            written = [p for p in [*glob.glob(pattern), self.step_path(step)] if os.path.lexists(p)]
            if not written or time.monotonic() > deadline:
                return
            for path in written:
                _remove_quietly(path)
            time.sleep(0.5)

    def record(self, step: int, event: str) -> None:
        """Append to the history a checkpoint known complete ("saved" or "restored"); a save
        by this version is marked as having array digests."""
        if jax.process_index() != 0:
            return
        entry = {"step": step, "event": event, "time": time.time()}
        if event == "saved":
            entry["digests"] = True
        try:
            append_line(self.history, json.dumps(entry))
        except OSError as err:
            raise CheckpointSaveError(
                f"could not record checkpoint {step} ({event}) in {self.history}:"
                f" {storage_failure(err) or _brief(err)}. Checkpoint {step} itself is complete at"
                f" {self.step_path(step)}. Free space (or fix the storage) and run the same"
                " command again to resume from it."
            ) from None

    def _saved_with_digests(self, step: int) -> bool:
        """Whether the history records `step` as saved by a version that writes digests."""
        try:
            with open(self.history, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except OSError:
            return False
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("step") == step and entry.get("digests"):
                return True
        return False

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
        shardings), so nothing has to be resharded afterwards; every array is checked against
        the digest saved with it. Every process must call it."""
        expected = self._expected_digests(step)
        target, added = self._restore_target(step, abstract_state)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target)),
            )
        except Exception as err:  # orbax raises many types for damaged or foreign trees
            self._refuse_another_model(step, abstract_state, err)
            raise self.damaged(step, f"its arrays cannot be read ({_brief(err)})") from err
        state = restored.state
        if added:
            state = abstract_state.replace(**state, **added)
        if expected is not None:
            self._verify(step, state, expected, abstract_state)
        return state

    def _restore_target(self, step: int, abstract_state):
        """(what to restore checkpoint `step` into, the state fields it lacks). A checkpoint
        written before a state field existed lacks it; where that field is empty in this run
        (TrainState.extras of a plain DINO run) the stored fields are restored by name and
        the field is added back empty. Otherwise the target is `abstract_state` itself."""
        if not dataclasses.is_dataclass(abstract_state):
            return abstract_state, {}
        try:
            stored = set(self.manager.item_metadata(step)["state"].keys())
        except Exception:  # unreadable metadata: the restore itself reports the damage
            return abstract_state, {}
        fields = {
            f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)
        }
        added = {k: v for k, v in fields.items() if k not in stored and not jax.tree.leaves(v)}
        if not added:
            return abstract_state, {}
        return {k: v for k, v in fields.items() if k not in added}, added

    def _expected_digests(self, step: int) -> dict[str, str] | None:
        """The digests recorded with checkpoint `step`; None (with a warning) for one written
        before digests existed, which is resumed unverified."""
        meta = self.read_meta(step)
        try:
            expected = recorded_digests(meta)
        except ValueError as err:
            raise self.damaged(step, str(err)) from None
        if expected is None and self._saved_with_digests(step):
            raise self.damaged(
                step,
                f"its record of array digests is missing, though {HISTORY} records it as saved"
                " with one",
            )
        if expected is None:
            _LOG.warning(
                "checkpoint %d was written before checkpoints recorded array digests: its"
                " arrays are resumed unverified (the checkpoints saved from now on carry them)",
                step,
            )
        return expected

    def _verify(self, step: int, state, expected: dict[str, str], abstract_state) -> None:
        differences = digest_mismatches(expected, array_digests(state))
        if not differences:
            return
        self._refuse_another_model(step, abstract_state, None)
        shown = "\n".join(f"  {d}" for d in differences[:8])
        more = f"\n  ... and {len(differences) - 8} more" if len(differences) > 8 else ""
        raise self.damaged(
            step,
            f"{len(differences)} of its arrays read back"
            f" {'differs' if len(differences) == 1 else 'differ'} from what was saved (their"
            f" digests do not match: the data files changed after the save):\n{shown}{more}",
        )

    def _refuse_another_model(self, step: int, abstract_state, err: Exception | None) -> None:
        """Raise the error naming the arrays that differ if checkpoint `step` was written for
        another model."""
        differences = self._model_differences(step, abstract_state)
        if differences:
            shown = "\n".join(f"  {d}" for d in differences[:8])
            raise CheckpointError(
                f"checkpoint {step} at {self.step_path(step)} was written for a different"
                f" model: {len(differences)} arrays differ:\n{shown}\nResume with the"
                " config it was written with, or start a new work directory."
            ) from err

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

    def close(self) -> None:
        self.manager.close()


def _array_specs(tree) -> dict[str, tuple]:
    """Array name ("opt_state.1.mu.head.last_layer.kernel") -> (shape, dtype name)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        jax.tree_util.keystr(p, simple=True, separator="."): (tuple(x.shape), str(x.dtype))
        for p, x in leaves
    }


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
