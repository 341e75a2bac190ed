"""Preemption notices (SIGTERM) for the training loop."""

from __future__ import annotations

import signal

import jax


class Preemption:
    """SIGTERM (a scheduler's preemption notice) as a stop that the loop checks every step.

    One process: a signal handler sets a flag. Several: JAX's preemption sync manager (started
    by jax.distributed.initialize) catches the signal and makes all processes agree on the step
    to stop at; a process stopping alone would leave the others waiting in a collective.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._synced = jax.process_count() > 1

    def __enter__(self):
        if not self._synced:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def stop_after(self, step: int) -> bool:
        """Whether to save and stop after `step`; every process must ask at every step."""
        if self._synced and not self.requested:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if not self._synced:
            signal.signal(signal.SIGTERM, self._previous)
