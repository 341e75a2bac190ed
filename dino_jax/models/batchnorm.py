"""BatchNorm as PyTorch computes it, with its running statistics as Flax `batch_stats`.

The differences from `flax.linen.BatchNorm` that matter for parity with the official code:
the running variance is updated with the *unbiased* batch variance (PyTorch's
`var * n / (n - 1)`), while the output is normalised with the biased one; and the layer
counts its train-mode calls (`num_batches_tracked`). Momentum is PyTorch's 0.1, i.e.
`running = 0.9 * running + 0.1 * batch`.

Synchronised BatchNorm needs no code here: under `jax.jit` with the batch sharded over a
mesh, the mean over the batch axis is already the mean over the global batch, which is what
`nn.SyncBatchNorm` gives the official multi-GPU runs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

BN_EPS = 1e-5  # torch.nn.BatchNorm1d / BatchNorm2d / SyncBatchNorm default
BN_MOMENTUM = 0.1  # PyTorch's convention: weight of the new batch statistics


class BatchNorm(nn.Module):
    """Per-channel (last axis) batch normalisation.

    params: `scale`, `bias` (PyTorch `weight`, `bias`); batch_stats: `mean`, `var` (float32,
    `running_mean`, `running_var`) and `count` (int32, `num_batches_tracked`).

    `use_running_average=True` normalises with the running statistics (PyTorch eval mode);
    False with the statistics of the batch at hand (train mode), and then updates the
    running ones unless the module is being initialised (call `apply` with
    `mutable=["batch_stats"]`).
    """

    epsilon: float = BN_EPS
    momentum: float = BN_MOMENTUM
    scale_init: Any = nn.initializers.ones
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool = True) -> jax.Array:
        dim = x.shape[-1]
        scale = self.param("scale", self.scale_init, (dim,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (dim,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (dim,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (dim,), jnp.float32)
        count = self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)

        x32 = x.astype(jnp.float32)
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            n = x32.size // dim
            mean = x32.mean(axes)
            var = jnp.square(x32 - mean).mean(axes)  # biased: what the output is normalised by
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
                unbiased = var * (n / max(n - 1, 1))
                ra_var.value = (1.0 - m) * ra_var.value + m * unbiased
                count.value = count.value + 1
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)
