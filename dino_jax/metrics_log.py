"""Run logs in the work directory: JSON lines, TensorBoard scalars and a progress bar.

Only process 0 writes; every process may call. `train.jsonl` holds one object per logged
step; `tensorboard/` holds event files (`tensorboard --logdir <workdir>/tensorboard`).
While the progress bar is shown, log records go out above it (see `_LogsAboveBar`).
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax

from dino_jax.tensorboard import ScalarWriter

_LOG = logging.getLogger(__name__)


class _LogsAboveBar:
    """Has the root logger's handlers clear the bar before writing a record, then redraw it.

    A bar keeps its cursor at the end of its own line, so a handler writing to the same
    terminal would append to the bar's text. Each handler's `emit` is wrapped in tqdm's
    `external_write_mode` for as long as the bar lives. The handlers themselves stay in
    place: train.py adds filters to absl's handler, and pytest removes its own handlers by
    identity, which replacing them with wrappers would break. `emit` runs only for records
    that passed the handler's level and filters, so dropped records leave the bar alone.
    Only the root logger's handlers are wrapped: the records of our modules, of absl
    (train.py, Orbax) and of JAX reach them by propagation.
    """

    def __init__(self, bar):
        from absl.logging import ABSLHandler

        self._wrapped = []  # (handler, its own instance-level emit or None, our wrapper)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, ABSLHandler):
                # absl's handler hands each record to its inner handler's handle(), never
                # calling its own emit(): the inner one is where the writing happens.
                handler = handler.python_handler
            own = vars(handler).get("emit")
            wrapper = self._wrap(bar, handler.emit)
            handler.emit = wrapper
            self._wrapped.append((handler, own, wrapper))

    @staticmethod
    def _wrap(bar, emit):
        def emit_above_bar(record):
            with type(bar).external_write_mode(file=bar.fp):
                emit(record)

        return emit_above_bar

    def restore(self) -> None:
        for handler, own, wrapper in self._wrapped:
            if vars(handler).get("emit") is not wrapper:
                continue  # someone else has rewrapped it since: leave theirs
            if own is None:
                del handler.emit
            else:
                handler.emit = own
        self._wrapped = []


class MetricLogger:
    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        start_step: int,
        images_per_step: int,
        log_every: int,
        progress_bar: bool = True,
    ):
        self.active = jax.process_index() == 0
        self.log_every = log_every
        self.images_per_step = images_per_step
        self._window_start = (start_step, time.perf_counter())
        self._postfix: dict[str, str] = {}  # the last loss and images/s shown on the bar
        self._bar = None
        self._logs_above_bar = None
        if not self.active:
            return
        self._jsonl = open(os.path.join(workdir, "train.jsonl"), "a")  # noqa: SIM115
        self._tb = ScalarWriter(os.path.join(workdir, "tensorboard"))
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            self._logs_above_bar = _LogsAboveBar(self._bar)

    def advance(self, step: int) -> None:
        """Move the bar on to `step` (every step, as it is dispatched; no metrics needed)."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)  # redraws, postfix included

    def train(
        self, step: int, values: dict[str, float], skips=None, now: float | None = None
    ) -> None:
        """The training metrics after `step` steps, fetched once the step ran: the loss goes on
        the bar, and a step that is a multiple of log_every is recorded, with the images per
        second since the last one recorded. `now`: time.perf_counter() when the step was seen
        complete (the metrics may come later), else the time of this call."""
        if not self.active:
            return
        if self._bar is not None:
            self._postfix["loss"] = f"{values.get('train/loss', float('nan')):.4f}"
            self._bar.set_postfix(self._postfix, refresh=False)
            self.advance(step)
        if step % self.log_every:
            return
        first, start_time = self._window_start
        now = time.perf_counter() if now is None else now
        if step > first and now > start_time:
            rate = (step - first) * self.images_per_step / (now - start_time)
            values = {**values, "perf/images_per_s": rate}
            self._postfix["img_s"] = f"{rate:,.0f}"
            if self._bar is not None:
                self._bar.set_postfix(self._postfix, refresh=False)
        self._window_start = (step, now)
        if skips is not None:
            values = {**values, "data/skipped_files": float(skips.count)}
        self.record(step, values)

    def record(self, step: int, values: dict[str, float]) -> None:
        """Write `values` at `step` to the JSON lines and TensorBoard (evaluations, etc.)."""
        if not self.active or not values:
            return
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        self._tb.scalars(step, values)
        self._tb.flush()
        if self._bar is None:
            shown = {k: round(v, 5) for k, v in values.items() if "/" in k}
            _LOG.info("step %d: %s", step, shown)

    def end_progress(self) -> None:
        """Leave the finished bar on screen; later log lines (the final evaluation's) follow
        it as plain lines."""
        if self._logs_above_bar is not None:
            self._logs_above_bar.restore()
            self._logs_above_bar = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        if not self.active:
            return
        self.end_progress()
        self._jsonl.close()
        self._tb.close()
