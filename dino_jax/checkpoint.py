"""Orbax checkpoints of the whole train state and its config, what a resume may change, and
the errors that name a damaged, foreign or missing checkpoint with the way out.

Orbax renames a checkpoint into place only when complete: a killed run never sees a partial
one. Each checkpoint also records a digest of every array (see `array_digests`), and a restore
compares the arrays it read with them: Orbax checks its tree files but not the array data, so
without this a flipped bit in a data file would be resumed from silently. A save that the
storage fails (disk full, I/O error) raises CheckpointSaveError, which names that save and the
last complete checkpoint, and removes what the failed save left."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import gc
import glob
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

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
    "model.attention",  # and model.attention_pad: the same attention, another kernel
    "model.remat",  # recomputes activations, the same values
    "aug.window",  # the same crops from less of the canvas
    "optim.branch_updates",  # the same values, another program
    "optim.wait_for_gradient",  # the same values, another program
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


# --- Array digests -------------------------------------------------------------------------
#
# Written into the "meta" item of every checkpoint, so they are committed with the arrays.
# A digest is two 32-bit sums over the elements of one array, of each element's bits mixed
# with a salt of its position (and mixed once more for the second sum). It is computed where
# the arrays live, one small jitted program per kind of array (shape, dtype, sharding): the
# same value on every process and for any device layout (a checkpoint may be resumed on
# another mesh), an element-wise pass like the finiteness check before each save, with no
# copy to the host. Any change confined to one 32-bit word changes both sums (mixing is a
# bijection); other damage goes unseen with a chance of about 2**-64. It guards against
# accidents, not against someone who rewrites the record too.
FORMAT_KEY = "checkpoint_format"
FORMAT = 2  # 1 (the key absent): written before array digests existed
DIGESTS_KEY = "array_digests"
DIGEST_SCHEME = "position-salted-mix32x2"
_POSITION_STEP = 0x9E3779B9  # odd: distinct positions get distinct salts
_SALT_SEED = 0x243F6A88
_SECOND_SUM_SEED = 0x85A308D3


def _mix32(h: jax.Array) -> jax.Array:
    """A bijection of uint32 words in which every input bit moves about half the output bits
    (xor-shifts and odd multipliers)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words: one per element, two per 64-bit element."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.iscomplexobj(x):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size < 4:
        return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
    return lax.bitcast_convert_type(x, jnp.uint32)  # 64-bit: a trailing axis of 2


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """The row-major index of every element of an array of `shape` (modulo 2**32)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _lanes(x: jax.Array) -> jax.Array:
    """The two uint32 sums of the digest of `x`."""
    words = _words(x)
    positions = _positions(words.shape)
    salts = _mix32(positions * jnp.uint32(_POSITION_STEP) + jnp.uint32(_SALT_SEED))
    mixed = _mix32(words ^ salts)
    again = _mix32(mixed ^ jnp.uint32(_SECOND_SUM_SEED))
    return jnp.stack([jnp.sum(mixed, dtype=jnp.uint32), jnp.sum(again, dtype=jnp.uint32)])


@functools.cache
def _digest_program(out_sharding):
    """The jitted digest of one array (compiled once per shape, dtype and sharding)."""
    return jax.jit(_lanes, out_shardings=out_sharding)


def _replicated_like(x) -> NamedSharding | None:
    """Every device of `x`'s mesh holds the result: each process can read it."""
    sharding = getattr(x, "sharding", None)
    return (
        NamedSharding(sharding.mesh, PartitionSpec())
        if isinstance(sharding, NamedSharding)
        else None
    )


def _named_leaves(tree) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(p, simple=True, separator="."), x) for p, x in leaves]


def array_digests(tree) -> dict[str, str]:
    """Array name -> its digest (16 hex digits) for every array of `tree`. Every process of a
    multi-process run must call it (collective programs over the global arrays)."""
    named = _named_leaves(tree)
    sums = jax.device_get([_digest_program(_replicated_like(x))(x) for _, x in named])
    return {
        name: "".join(f"{int(v):08x}" for v in np.asarray(pair))
        for (name, _), pair in zip(named, sums, strict=True)
    }


def digest_record(tree) -> dict[str, Any]:
    """What a checkpoint's meta item holds about its arrays: the format and the digests."""
    return {
        FORMAT_KEY: FORMAT,
        DIGESTS_KEY: {"scheme": DIGEST_SCHEME, "arrays": array_digests(tree)},
    }


def recorded_digests(meta: dict[str, Any]) -> dict[str, str] | None:
    """The digests a checkpoint's meta item records; None for a checkpoint written before
    digests existed. ValueError (saying what is wrong) for a record that is missing from a
    checkpoint of this format, malformed, or of an unknown scheme."""
    if FORMAT_KEY not in meta and DIGESTS_KEY not in meta:
        return None
    record = meta.get(DIGESTS_KEY)
    if record is None:
        raise ValueError("its record of array digests is missing")
    if not isinstance(record, dict) or not isinstance(record.get("arrays"), dict):
        raise ValueError("its record of array digests is malformed")
    if record.get("scheme") != DIGEST_SCHEME:
        raise ValueError(
            f"its array digests are of an unknown kind {record.get('scheme')!r} (this version"
            f" writes {DIGEST_SCHEME!r}): written by a newer dino_jax?"
        )
    arrays = record["arrays"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in arrays.items()):
        raise ValueError("its record of array digests is malformed")
    return arrays


def digest_mismatches(
    recorded: dict[str, str], actual: dict[str, str], *, partial: bool = False
) -> list[str]:
    """Every array whose digest differs from the recorded one or has none, by name; also those
    recorded but not restored, unless `partial` (a restore of some arrays only)."""
    out = [
        f"{k}: its digest differs"
        for k in sorted(set(actual) & set(recorded))
        if recorded[k] != actual[k]
    ]
    out += [f"{k}: no digest recorded" for k in sorted(set(actual) - set(recorded))]
    if not partial:
        out += [f"{k}: recorded, but not restored" for k in sorted(set(recorded) - set(actual))]
    return out


# --- Storage failures ----------------------------------------------------------------------


class CheckpointSaveError(CheckpointError):
    """The storage failed while the run saved its work (a checkpoint, the checkpoint history,
    the final evaluation): disk full, I/O error. The message names what failed and the last
    complete checkpoint. The train command exits with status 4."""


# Tensorstore (Orbax's array writer) reports an OS error as `[os_error_code='28']`; Python as
# `[Errno 28]`. Errors without an errno from storage that is not a local disk (a bucket) carry
# one of these status codes.
_ERRNO_IN_TEXT = re.compile(r"os_error_code='(\d+)'|\[Errno (\d+)\]")
_STORAGE_STATUSES = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAVAILABLE", "DATA_LOSS")


def _errors_in_chain(err: BaseException) -> list[BaseException]:
    """`err`, its causes and contexts, and the members of exception groups among them."""
    seen, todo = [], [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return seen


def storage_failure(err: BaseException) -> str | None:
    """What failed in the storage (e.g. "No space left on device [ENOSPC]") if `err` comes
    from an operating-system or storage error; None for any other error (a bug)."""
    chain = _errors_in_chain(err)
    for e in chain:
        code = e.errno if isinstance(e, OSError) else None
        if code is None and (match := _ERRNO_IN_TEXT.search(str(e))):
            code = int(match.group(1) or match.group(2))
        if code:
            return f"{os.strerror(code)} [{errno.errorcode.get(code, code)}]"
    for e in chain:
        text = str(e).strip()
        if text.startswith(_STORAGE_STATUSES):
            first = text.splitlines()[0]
            return first if len(first) <= 300 else first[:300] + "..."
    return None


def append_line(path: str, line: str) -> None:
    """Append `line` to a text file in one write, first ending a line that an earlier failed
    write left unfinished (so that the two do not run together into one unreadable line)."""
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        lead = b""
        if end:
            f.seek(end - 1)
            lead = b"" if f.read(1) == b"\n" else b"\n"
        f.write(lead + line.encode("utf-8") + b"\n")


def write_atomically(path: str, text: str, if_failed: str) -> None:
    """Write `path` whole or not at all (a temporary file renamed into place). A storage
    failure raises CheckpointSaveError saying what failed, then `if_failed` (what is safe
    and what to do)."""
    temporary = path + ".tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except OSError as err:
        _remove_quietly(temporary)
        raise CheckpointSaveError(
            f"could not write {path}: {storage_failure(err) or _brief(err)}; {if_failed}"
        ) from None


def _remove_quietly(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError:
        pass


def newest_complete_checkpoint(directory: str, but: int | None = None) -> int | None:
    """The newest complete checkpoint in `directory` (Orbax's step directories are renamed
    into place only when complete), leaving out step `but`."""
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    steps = [int(n) for n in names if n.isdigit() and int(n) != but]
    return max((s for s in steps if os.path.isdir(os.path.join(directory, str(s)))), default=None)


def _what_is_left(directory: str, last: int | None) -> str:
    """The sentence of a storage-failure message about the last complete checkpoint."""
    if last is None:
        return "No checkpoint is complete yet: a new start trains from step 0."
    return (
        f"The last complete checkpoint is step {last} at {os.path.join(directory, str(last))}"
        " (intact)."
    )


_AGAIN = "Free space (or fix the storage) and run the same command again to resume."


def save_failure_message(step: int, directory: str, why: str, last: int | None) -> str:
    """The message of a failed save of checkpoint `step` in `directory`: which, why, and the
    last complete checkpoint (`last`)."""
    return (
        f"could not save checkpoint {step} to {os.path.join(directory, str(step))}: {why}."
        f" What the save wrote was removed. {_what_is_left(directory, last)} {_AGAIN}"
    )


def storage_error(err: BaseException, workdir: str) -> CheckpointSaveError | None:
    """For a storage failure met outside a checkpoint save (writing a log, say): the error
    naming the file and the last complete checkpoint of `workdir`; None for other errors."""
    why = storage_failure(err)
    if why is None:
        return None
    what = getattr(err, "filename", None) or f"a file of {workdir}"
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    left = _what_is_left(directory, newest_complete_checkpoint(directory))
    return CheckpointSaveError(f"could not write {what}: {why}. {left} {_AGAIN}")


def _drop_orbax_storage_failure(record: logging.LogRecord) -> bool:
    """Orbax logs one failed write with its traceback from each of its threads (hundreds of
    lines for one full disk); CheckpointSaveError reports it once. Such records are dropped,
    leaving one line at DEBUG level."""
    exc = record.exc_info[1] if record.exc_info else None
    if (
        record.levelno >= logging.ERROR
        and f"{os.sep}orbax{os.sep}" in record.pathname
        and exc is not None
        and storage_failure(exc)
    ):
        _LOG.debug("Orbax: %s (%s)", record.getMessage().splitlines()[0], _brief(exc))
        return False
    return True


def _drop_lost_storage_failure(record: logging.LogRecord) -> bool:
    """The writes of a failed save that were still in flight end with the same error, which
    asyncio reports once per write when it collects them ("exception was never retrieved"):
    such records are dropped."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (record.levelno >= logging.ERROR and exc is not None and storage_failure(exc))


def _leftover_of_failed_write(unraisable, orbax=f"{os.sep}orbax{os.sep}") -> bool:
    """An error that a failed save's abandoned writes raise where nobody can catch it: a
    storage callback that finds Orbax's event loop closed, or an Orbax coroutine finalised
    late (at exit, when it can no longer import what it needs)."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and orbax in code.co_filename:
        return True
    return (
        unraisable.object is None
        and isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
    )


def _quiet_unraisable(previous):
    def hook(unraisable, previous=previous, leftover=_leftover_of_failed_write):
        if not leftover(unraisable):
            previous(unraisable)

    hook.quiets_failed_writes = True
    return hook


def _quiet_orbax_storage_failures() -> None:
    """Keep the aftermath of a storage failure off stderr: CheckpointSaveError reports it."""
    for name, drop in (
        ("absl", _drop_orbax_storage_failure),  # Orbax logs through absl
        ("asyncio", _drop_lost_storage_failure),
    ):
        logger = logging.getLogger(name)
        if drop not in logger.filters:
            logger.addFilter(drop)
    if not getattr(sys.unraisablehook, "quiets_failed_writes", False):
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


def _settle_orbax_threads(timeout: float) -> None:
    """After a failed save, end Orbax's threads of that save (within `timeout` seconds): those
    still writing end soon with the same error; those waiting for a step that failed (say the
    creation of the directory) would wait for Orbax's timeout, 20 minutes, and keep the
    process from exiting, so they are cancelled and released. Then nothing writes into the
    directory once it is removed, and no write outlives the process to report itself at exit."""
    from orbax.checkpoint._src.futures import future as orbax_future  # internal: guarded

    waiter = getattr(orbax_future, "_SignalingThread", None)
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        target = getattr(thread, "_target", None)
        modules = (type(thread).__module__, getattr(target, "__module__", None) or "")
        if thread is threading.current_thread() or not any(m.startswith("orbax") for m in modules):
            continue
        if waiter is not None and isinstance(thread, waiter) and jax.process_count() == 1:
            with contextlib.suppress(Exception):  # cancelled, it skips its work once released
                thread.cancel()
                signals = thread._receive_signals
                orbax_future.set_signals(signals, operation_id=thread._operation_id)
        with contextlib.suppress(Exception):  # Orbax's threads raise their error again on join
            thread.join(max(0.0, deadline - time.monotonic()))
    gc.collect()  # what the failed writes left is reported (quietly, above) now, not at exit


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
