"""What Orbax leaves of a save the storage failed: its reports kept quiet, its threads ended."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import threading
import time

import jax

from dino_jax.checkpoint_storage import _brief, storage_failure

_LOG = logging.getLogger(__name__)


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
