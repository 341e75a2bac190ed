"""The official optimiser as an optax chain: per-tensor clipping, then PyTorch-style AdamW.

PyTorch's AdamW keeps a step count per parameter and skips a parameter whose gradient is
None (no update, no decay, no moment or count change). DINO relies on that to freeze the
last layer during the first epoch(s); zeroing its gradient in optax would still move its
moments, its bias correction and its weight decay. So the AdamW here keeps per-leaf counts
and takes the step (`tx.update(..., step=state.step)`) to decide what is frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dino_jax.schedules import Schedules

PyTree = Any
PathPredicate = Callable[[str, jax.Array], bool]


def official_decay(name: str, param: jax.Array) -> bool:
    """utils.get_params_groups: no decay on biases and 1-D params (norm scales); cls_token,
    pos_embed and every other weight are decayed."""
    return not (name.endswith("bias") or param.ndim <= 1)


def is_last_layer(name: str, param: jax.Array) -> bool:
    """utils.cancel_gradients_last_layer matches any parameter with 'last_layer' in its name."""
    return "last_layer" in name


def frozen_weight_g(norm_last_layer: bool) -> PathPredicate:
    """With norm_last_layer the prototype gains are fixed at 1 (requires_grad=False)."""
    return lambda name, param: norm_last_layer and name.endswith("last_layer/weight_g")


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """utils.clip_gradients: each tensor scaled by max_norm / (||g|| + 1e-6) when that is < 1.

    Not a global-norm clip: every parameter is clipped on its own. max_norm = 0 disables it.
    """

    def update(grads, state, params=None):
        del params
        if not max_norm:
            return grads, state

        def clip(g):
            coef = max_norm / (jnp.linalg.norm(g.astype(jnp.float32)) + 1e-6)
            return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)

        return jax.tree.map(clip, grads), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class TorchAdamWState(NamedTuple):
    count: PyTree  # int32 per leaf: PyTorch's per-parameter step
    mu: PyTree
    nu: PyTree


def torch_adamw(
    learning_rate: Callable[[jax.Array], jax.Array],
    weight_decay: Callable[[jax.Array], jax.Array],
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    decay: PathPredicate = official_decay,
    skipped: Callable[[str, jax.Array, jax.Array], jax.Array] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """torch.optim.AdamW with schedules of the step and per-step skipped parameters.

    `skipped(name, param, step)` is True where PyTorch would see no gradient at that step:
    such a leaf is left exactly as it was (value, moments and count).
    """

    def init(params):
        return TorchAdamWState(
            count=jax.tree.map(lambda p: jnp.zeros([], jnp.int32), params),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
        )

    def update(grads, state, params=None, *, step, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("torch_adamw needs params (decoupled weight decay)")
        lr = learning_rate(step)
        wd = weight_decay(step)

        def leaf(path, g, p, count, mu, nu):
            name = jax.tree_util.keystr(path, simple=True, separator="/")  # a/b/bias
            active = ~skipped(name, p, step) if skipped is not None else jnp.bool_(True)
            new_count = count + active.astype(jnp.int32)
            new_mu = b1 * mu + (1.0 - b1) * g
            new_nu = b2 * nu + (1.0 - b2) * jnp.square(g)
            t = jnp.maximum(new_count, 1).astype(jnp.float32)
            denom = jnp.sqrt(new_nu) / jnp.sqrt(1.0 - b2**t) + eps
            u = -(lr / (1.0 - b1**t)) * new_mu / denom
            if decay(name, p):
                u = u - lr * wd * p  # p * (1 - lr * wd), applied with the Adam step
            return (
                jnp.where(active, u, 0.0).astype(p.dtype),
                new_count,
                jnp.where(active, new_mu, mu),
                jnp.where(active, new_nu, nu),
            )

        out = jax.tree_util.tree_map_with_path(leaf, grads, params, state.count, state.mu, state.nu)
        treedef = jax.tree.structure(grads)
        updates, count, mu, nu = (
            jax.tree.unflatten(treedef, [x[i] for x in treedef.flatten_up_to(out)])
            for i in range(4)
        )
        return updates, TorchAdamWState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init, update)


def dino_optimizer(
    schedules: Schedules,
    *,
    clip_grad: float = 3.0,
    norm_last_layer: bool = True,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """The official recipe: per-tensor clip, AdamW with the decay mask and the lr/wd
    schedules, the last layer skipped while epoch < freeze_last_layer, fixed gains skipped
    always. Call `update(grads, opt_state, params, step=step)`."""
    fixed_gain = frozen_weight_g(norm_last_layer)

    def skipped(name, param, step):
        frozen_now = is_last_layer(name, param) & schedules.last_layer_frozen(step)
        return jnp.logical_or(fixed_gain(name, param), frozen_now)

    return optax.chain(
        clip_per_tensor(clip_grad),
        torch_adamw(schedules.lr, schedules.wd, b1=b1, b2=b2, eps=eps, skipped=skipped),
    )
