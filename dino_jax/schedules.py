"""Learning rate, weight decay, teacher momentum and temperature as pure functions of the step.

Each reproduces one official schedule array (utils.cosine_scheduler, DINOLoss's temperature
schedule) evaluated at an index, so it can run inside the compiled step with no table.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def cosine_schedule(
    step,
    *,
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
):
    """utils.cosine_scheduler(...)[step]: linspace warm-up, then a half cosine to `final`.

    The warm-up is np.linspace(warmup_start, base, warmup_steps) (its last value is `base`),
    the cosine final + (base - final)(1 + cos(pi i / n)) / 2 over the n = total - warmup
    remaining steps. Steps past the end keep the last value.
    """
    step = jnp.minimum(jnp.asarray(step), total_steps - 1)
    warm = warmup_start + (base - warmup_start) * step / max(warmup_steps - 1, 1)
    i = jnp.maximum(step - warmup_steps, 0)
    n = total_steps - warmup_steps
    cosine = final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * i / n))
    return jnp.where(step < warmup_steps, warm, cosine)


def warmup_constant_schedule(epoch, *, start: float, value: float, warmup_epochs: int):
    """DINOLoss.teacher_temp_schedule[epoch]: linspace(start, value, warmup_epochs), then value."""
    epoch = jnp.asarray(epoch)
    warm = start + (value - start) * epoch / max(warmup_epochs - 1, 1)
    return jnp.where(epoch < warmup_epochs, warm, value)


@dataclasses.dataclass(frozen=True)
class Schedules:
    """Every schedule of the recipe, bound to its hyper-parameters; methods take the step.

    `base_lr` is the peak rate after linear batch scaling (lr * global_batch / 256).
    """

    steps_per_epoch: int
    epochs: int
    base_lr: float
    min_lr: float
    warmup_epochs: int
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    teacher_temp: float
    warmup_teacher_temp: float
    warmup_teacher_temp_epochs: int
    freeze_last_layer: int  # epochs during which the last layer gets no update

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def epoch(self, step):
        return jnp.asarray(step) // self.steps_per_epoch

    def lr(self, step):
        return cosine_schedule(
            step,
            base=self.base_lr,
            final=self.min_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_epochs * self.steps_per_epoch,
        )

    def wd(self, step):
        return cosine_schedule(
            step, base=self.weight_decay, final=self.weight_decay_end, total_steps=self.total_steps
        )

    def momentum(self, step):
        return cosine_schedule(
            step, base=self.momentum_teacher, final=1.0, total_steps=self.total_steps
        )

    def teacher_temp_at(self, step):
        # Indexed by epoch, as the official loss: constant within an epoch.
        return warmup_constant_schedule(
            self.epoch(step),
            start=self.warmup_teacher_temp,
            value=self.teacher_temp,
            warmup_epochs=self.warmup_teacher_temp_epochs,
        )

    def last_layer_frozen(self, step):
        return self.epoch(step) < self.freeze_last_layer
