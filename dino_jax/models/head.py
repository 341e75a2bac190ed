"""The DINO projection head: MLP, L2 normalisation, weight-normalised prototypes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dino_jax.models.batchnorm import BatchNorm
from dino_jax.models.vit import Dtype, exact_gelu, torch_default_uniform, trunc_normal_02


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight norm w = g * v / ||v|| per output unit (prototype).

    Stores `weight_v` (in, K) and `weight_g` (1, K), transposes of PyTorch's [K, in], [K, 1].
    """

    in_features: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    out_dtype: Dtype = jnp.float32

    def setup(self):
        # Stays at PyTorch's default Linear init U(+-1/sqrt(in)) in the official head: its
        # trunc-normal init ran before the last layer was created.
        self.weight_v = self.param(
            "weight_v",
            torch_default_uniform(self.in_features),
            (self.in_features, self.features),
            self.param_dtype,
        )
        self.weight_g = self.param(
            "weight_g", nn.initializers.ones, (1, self.features), self.param_dtype
        )

    def weight(self) -> jax.Array:
        v = self.weight_v.astype(jnp.float32)
        # No epsilon, as torch.nn.utils.weight_norm.
        return self.weight_g.astype(jnp.float32) * v / jnp.linalg.norm(v, axis=0, keepdims=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        # bf16 operands (when so configured) but float32 accumulation and output.
        return jnp.einsum(
            "...d,dk->...k",
            x.astype(self.dtype),
            self.weight().astype(self.dtype),
            preferred_element_type=jnp.float32,
        ).astype(self.out_dtype)


class DINOHead(nn.Module):
    """Linear(D, hidden) [BN] GELU ... Linear(hidden, bottleneck) -> L2 norm -> prototypes.

    Submodule names follow the official nn.Sequential indices (`mlp_0`, `mlp_2`, ...; a single
    `mlp` when nlayers == 1), then `last_layer`. `norm_last_layer` (g frozen at 1) is an
    optimiser setting, not a forward one, so it does not appear here. Logits come out in
    `logits_dtype` (float32 by default: the teacher's softmax at temperature 0.04 is not
    safe in bfloat16).
    """

    out_dim: int = 65536
    use_bn: bool = False
    nlayers: int = 3
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    logits_dtype: Dtype = jnp.float32

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(
            features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=trunc_normal_02,
            bias_init=nn.initializers.zeros,
            name=name,
        )

    def setup(self):
        if self.nlayers < 1:
            raise ValueError(f"head nlayers must be >= 1, got {self.nlayers}")
        if self.nlayers == 1:
            layers = [self._dense(self.bottleneck_dim, "mlp")]
        else:
            layers, index = [], 0
            for _ in range(self.nlayers - 1):
                layers.append(self._dense(self.hidden_dim, f"mlp_{index}"))
                index += 1
                if self.use_bn:
                    layers.append(
                        BatchNorm(
                            dtype=self.dtype, param_dtype=self.param_dtype, name=f"mlp_{index}"
                        )
                    )
                    index += 1
                layers.append(exact_gelu)
                index += 1  # the GELU holds an index of the official nn.Sequential too
            layers.append(self._dense(self.bottleneck_dim, f"mlp_{index}"))
        self.layers = layers
        self.last_layer = WeightNormLinear(
            self.bottleneck_dim,
            self.out_dim,
            self.dtype,
            self.param_dtype,
            self.logits_dtype,
            name="last_layer",
        )

    def mlp(self, x: jax.Array, use_running_average: bool = True) -> jax.Array:
        """The head's MLP (official `head.mlp`), before the L2 normalisation.

        `use_running_average` sets the mode of the BatchNorms (`use_bn`; no effect without):
        False normalises with the statistics of this call's batch and updates the running
        ones (`apply(..., mutable=["batch_stats"])`), as the official head in train mode.
        """
        for layer in self.layers:
            x = layer(x, use_running_average) if isinstance(layer, BatchNorm) else layer(x)
        return x

    def prototypes(self) -> jax.Array:
        """Effective (bottleneck, K) prototype matrix g * v / ||v||."""
        return self.last_layer.weight()

    def embed(self, x: jax.Array, use_running_average: bool = True) -> jax.Array:
        """The MLP's output L2-normalised in float32, what the last layer maps to logits."""
        x = self.mlp(x, use_running_average).astype(jnp.float32)
        # F.normalize: x / max(||x||, 1e-12), in float32.
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def __call__(self, x: jax.Array, use_running_average: bool = True) -> jax.Array:
        return self.last_layer(self.embed(x, use_running_average))
