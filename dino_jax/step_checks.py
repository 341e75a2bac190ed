"""The host's side of the compiled steps in flight: when the training loop waits, when it
fetches metrics, and how it still finds every non-finite step before anything is saved."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from dino_jax.train_step import finite_step

if TYPE_CHECKING:
    from dino_jax.checkpoint import Checkpointer

_LOG = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is untouched."""


def nonfinite(metrics: dict[str, jax.Array]) -> jax.Array:
    """1 (int32) when the step's loss or gradient norm is not finite, else 0: the steps that
    stop a run, or that train.skip_nonfinite_steps skips (train/skipped)."""
    ok = finite_step(metrics["train/loss"], metrics["train/grad_norm"])
    return (~ok).astype(jnp.int32)


# The transfer guard level (jax.transfer_guard) of the loop's per-step part, for transfers of
# the device's results to the host; tests set "disallow_explicit": a step's metrics then reach
# the host only through _fetch, at the checks.
STEP_TRANSFER_GUARD = "allow"


@contextlib.contextmanager
def per_step_guard() -> Iterator[None]:
    """STEP_TRANSFER_GUARD around what the loop does every step; transfers to and between
    devices may only be explicit (each batch's own device_put is)."""
    level = STEP_TRANSFER_GUARD
    implicit_only = level.removesuffix("_explicit")
    with (
        jax.transfer_guard_device_to_host(level),
        jax.transfer_guard_host_to_device(implicit_only),
        jax.transfer_guard_device_to_device(implicit_only),
    ):
        yield


def _fetch(tree):
    """`tree` on the host: the training loop's only device-to-host transfers."""
    with jax.transfer_guard_device_to_host("allow"):
        return jax.device_get(tree)


_JUDGED = ("train/loss", "train/grad_norm", "train/skipped")  # what the non-finite check reads


@dataclasses.dataclass
class _Unchecked:
    """A dispatched step whose metrics the host has not looked at yet: its index, its metrics
    on the device, the device's count of non-finite steps up to it, and when the host saw it
    complete (time.perf_counter(); None: not yet)."""

    index: int
    metrics: dict[str, jax.Array]
    count: jax.Array
    seen_done: float | None = None


class StepChecks:
    """The host's side of the steps in flight.

    At most `in_flight` dispatched steps run ahead of the host: after dispatching step s, it
    waits for step s - in_flight (a wait, no transfer), so it never waits for the step it has
    just dispatched. Metrics come to the host only at checks: a logged step's (every
    `log_every`) once it is seen done, and every step before a save, an evaluation and the
    end (`check()`). Between checks the device counts the non-finite steps
    (compile_loop_step); a check that finds the count grown fetches every step since the last
    check and judges each in order as the loop always did: a non-finite loss or gradient
    stops the run, unless train.skip_nonfinite_steps (`tolerated`) rides over that many in a
    row. A save is preceded by a check, so no state after a non-finite step is ever written.
    """

    def __init__(self, *, in_flight: int, log_every: int, tolerated: int, logger, skips, ckpt):
        self.in_flight = in_flight
        self.log_every = log_every
        self.tolerated = tolerated
        self.logger = logger
        self.skips = skips
        self.ckpt = ckpt
        self.bad_in_a_row = 0  # skipped steps in a row, up to the last step checked
        self._steps: collections.deque[_Unchecked] = collections.deque()
        self._counted = 0  # the device's count at the last check

    def logged(self, index: int) -> bool:
        return (index + 1) % self.log_every == 0

    def dispatched(
        self, index: int, metrics: dict[str, jax.Array], count: jax.Array
    ) -> dict[str, float]:
        """Step `index` was just dispatched: wait for the one `in_flight` steps before it and
        check up to it if it is logged. Returns the metrics fetched, if any."""
        self._steps.append(_Unchecked(index, metrics, count))
        behind = [
            s for s in self._steps if s.seen_done is None and s.index <= index - self.in_flight
        ]
        for s in behind:
            self._wait(s)
            if not self.logged(s.index):  # only the check reads it now
                s.metrics = {k: v for k, v in s.metrics.items() if k in _JUDGED}
        logged = [s.index for s in behind if self.logged(s.index)]
        return self.check(logged[-1]) if logged else {}

    @staticmethod
    def _wait(step: _Unchecked) -> None:
        jax.block_until_ready(step.count)
        step.seen_done = time.perf_counter()

    def check(self, upto: int | None = None) -> dict[str, float]:
        """Check the steps up to `upto` (None: every step dispatched, waiting for them) and log
        the logged ones; raises NonFiniteLossError as the loop's rules say (class doc).
        Returns the metrics of the last step fetched: with `upto` None, the last dispatched."""
        due = [s for s in self._steps if upto is None or s.index <= upto]
        if not due:
            return {}
        for s in due:
            if s.seen_done is None:
                self._wait(s)
        last = due[-1]
        wanted = [s for s in due if self.logged(s.index) or (upto is None and s is last)]
        count, fetched = _fetch((last.count, [s.metrics for s in wanted]))
        new_bad = int(count) > self._counted
        if new_bad:  # a non-finite step since the last check: look at each step, in order
            wanted, fetched = due, _fetch([s.metrics for s in due])
        else:
            self.bad_in_a_row = 0
        values = {}
        for s, device_values in zip(wanted, fetched, strict=True):
            values = {k: float(v) for k, v in device_values.items()}
            if new_bad:
                self._judge(s.index, values)
            if self.logged(s.index):
                self.logger.train(s.index + 1, values, skips=self.skips, now=s.seen_done)
        self._counted = int(count)
        for _ in due:
            self._steps.popleft()
        return values

    def _judge(self, step: int, values: dict[str, float]) -> None:
        """Stop on a non-finite loss before anything is saved, or ride over it (skipped)."""
        if values.get("train/skipped", 0.0) > 0:
            self.bad_in_a_row += 1
            if self.bad_in_a_row > self.tolerated:
                raise NonFiniteLossError(nonfinite_message(step, values, self.ckpt))
            _LOG.warning("non-finite loss at step %d: update skipped", step)
        elif not all(math.isfinite(values[k]) for k in ("train/loss", "train/grad_norm")):
            raise NonFiniteLossError(nonfinite_message(step, values, self.ckpt))
        else:
            self.bad_in_a_row = 0


def nonfinite_message(
    step: int, values: dict[str, float], ckpt: Checkpointer, what: str = "loss"
) -> str:
    ckpt.wait()  # the last good checkpoint may still be being written
    latest = ckpt.latest_step()
    where = (
        f"the last good checkpoint is step {latest} in {ckpt.directory} (intact)"
        if latest is not None
        else "no checkpoint was written yet"
    )
    found = (
        f"non-finite loss at step {step} (loss {values.get('train/loss')}, grad norm"
        f" {values.get('train/grad_norm')})"
        if what == "loss"
        else f"non-finite parameters after the update of step {step} (finite loss and gradient)"
    )
    return (
        f"{found}; training stopped and nothing was saved after it; {where}. Lower optim.lr,"
        " check the data, or set train.skip_nonfinite_steps."
    )
