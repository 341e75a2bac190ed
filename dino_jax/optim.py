"""The official optimisers as optax chains: per-tensor clipping, then PyTorch-style AdamW,
SGD or LARS (main_dino.py --optimizer adamw | sgd | lars).

PyTorch's optimizers skip a parameter whose gradient is None (no update, no decay, no state
change; AdamW's per-parameter step count does not advance). DINO relies on that to freeze
the last layer during the first epoch(s); zeroing its gradient in optax would still move its
moments or momentum buffer, its bias correction and its weight decay. So the rules here run
leaf by leaf and take the step (`tx.update(..., step=state.step)`) to decide what is frozen.
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
# (name, param, step) -> a Python bool where the answer is the same at every step, else a bool
# array of the step
SkipPredicate = Callable[[str, jax.Array, jax.Array], bool | jax.Array]
Schedule = Callable[[jax.Array], jax.Array]  # step -> value


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

        return jax.tree.map(lambda g: clip_tensor(g, max_norm), grads), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def clip_tensor(g: jax.Array, max_norm: float) -> jax.Array:
    """One tensor of utils.clip_gradients: scaled by max_norm / (||g|| + 1e-6) when < 1."""
    coef = max_norm / (jnp.linalg.norm(g.astype(jnp.float32)) + 1e-6)
    return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)


def guarded(skip: bool | jax.Array, update: Callable[[], tuple], keep: Callable[[], tuple], branch):
    """`update()` where `skip` is False, `keep()` where True: chosen when the step is traced
    if `skip` is a Python bool, else by `lax.cond` (`branch`) or a select of both results."""
    if isinstance(skip, bool):  # known when the step is traced
        return keep() if skip else update()
    if branch:
        return jax.lax.cond(skip, keep, update)
    active = ~jnp.asarray(skip)
    return tuple(jnp.where(active, n, o) for n, o in zip(update(), keep(), strict=True))


def leafwise(
    rule: Callable[..., tuple],
    grads: PyTree,
    params: PyTree,
    states: tuple[PyTree, ...],
    step: jax.Array,
    skipped: SkipPredicate | None,
    branch: bool = False,
) -> tuple[PyTree, ...]:
    """Apply a per-parameter update rule, with PyTorch's skip of parameters without gradient.

    `rule(name, g, p, *state_leaves)` returns `(update, *new_state_leaves)` for one
    parameter (`name` is its path, "a/b/bias"). Where `skipped(name, p, step)`, the update
    is zero and every state leaf keeps its old value, as PyTorch's optimizers `continue` past
    a `.grad` of None. Returns `(updates, *new_states)`, each with the structure of `grads`.

    A leaf skipped at some steps only is kept by a select of the new and the old values, or,
    with `branch`, by `lax.cond`: the same values, and the rule's work not done while skipped.
    The select reads each old moment beside the new one, and XLA then copies those donated
    buffers every step (the last layer's, 64 MiB each at K = 65536); a branch has none of
    these copies but is a conditional, which some GPU runtimes run with a host round trip
    (optim.branch_updates; docs/performance.md).
    """

    def leaf(path, g, p, *old):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        skip = False if skipped is None else skipped(name, p, step)

        def update():
            u, *new = rule(name, g, p, *old)
            return (u.astype(p.dtype), *new)

        def keep():
            return (jnp.zeros_like(p), *old)

        return guarded(skip, update, keep, branch)

    out = jax.tree_util.tree_map_with_path(leaf, grads, params, *states)
    treedef = jax.tree.structure(grads)
    return tuple(
        jax.tree.unflatten(treedef, [x[i] for x in treedef.flatten_up_to(out)])
        for i in range(1 + len(states))
    )


class TorchAdamWState(NamedTuple):
    count: PyTree  # int32 per leaf: PyTorch's per-parameter step
    mu: PyTree
    nu: PyTree


class AdamWHyper(NamedTuple):
    lr: jax.Array
    wd: jax.Array
    b1: float
    b2: float
    eps: float


def adamw_rule(h: AdamWHyper, decays: bool, g, p, count, mu, nu) -> tuple:
    """torch.optim.AdamW on one tensor (or one flat group of them, dino_jax.optim_flat):
    (update, count, mu, nu) after PyTorch's step."""
    new_count = count + 1
    new_mu = h.b1 * mu + (1.0 - h.b1) * g
    new_nu = h.b2 * nu + (1.0 - h.b2) * jnp.square(g)
    t = new_count.astype(jnp.float32)
    denom = jnp.sqrt(new_nu) / jnp.sqrt(1.0 - h.b2**t) + h.eps
    u = -(h.lr / (1.0 - h.b1**t)) * new_mu / denom
    if decays:
        u = u - h.lr * h.wd * p  # p * (1 - lr * wd), applied with the Adam step
    return u, new_count, new_mu, new_nu


def torch_adamw(
    learning_rate: Schedule,
    weight_decay: Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    decay: PathPredicate = official_decay,
    skipped: SkipPredicate | None = None,
    branch: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """torch.optim.AdamW with schedules of the step and per-step skipped parameters.

    `skipped(name, param, step)` is True where PyTorch would see no gradient at that step:
    such a leaf is left exactly as it was (value, moments and count); `branch`: how (leafwise).
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

        def rule(name, g, p, count, mu, nu):
            hyper = AdamWHyper(lr, wd, b1, b2, eps)
            return adamw_rule(hyper, decay(name, p), g, p, count, mu, nu)

        updates, count, mu, nu = leafwise(
            rule, grads, params, (state.count, state.mu, state.nu), step, skipped, branch
        )
        return updates, TorchAdamWState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init, update)


SGD_MOMENTUM = 0.9  # main_dino.py: torch.optim.SGD(params_groups, lr=0, momentum=0.9)


class TorchSGDState(NamedTuple):
    momentum_buffer: PyTree  # torch.optim.SGD's state name


def sgd_rule(lr, wd, momentum: float, decays: bool, g, p, buf) -> tuple:
    """torch.optim.SGD with momentum on one tensor (or one flat group): (update, buffer)."""
    d = g + wd * p if decays else g
    buf = momentum * buf + d
    return -lr * buf, buf


def torch_sgd(
    learning_rate: Schedule,
    weight_decay: Schedule,
    *,
    momentum: float = SGD_MOMENTUM,
    decay: PathPredicate = official_decay,
    skipped: SkipPredicate | None = None,
    branch: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """torch.optim.SGD(lr, momentum) as main_dino.py --optimizer sgd builds it (no dampening,
    no Nesterov), weight decay `d = g + wd * p` on the `decay` group only.

    PyTorch sets the buffer to a clone of `d` at a parameter's first update and to
    `momentum * buf + d` after; a buffer initialised to zeros gives exactly `d` the first
    time, so no per-parameter count is needed. Skipped leaves keep value and buffer.
    """

    def init(params):
        return TorchSGDState(momentum_buffer=jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None, *, step, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("torch_sgd needs params (weight decay)")
        lr = learning_rate(step)
        wd = weight_decay(step)

        def rule(name, g, p, buf):
            return sgd_rule(lr, wd, momentum, decay(name, p), g, p, buf)

        updates, buf = leafwise(
            rule, grads, params, (state.momentum_buffer,), step, skipped, branch
        )
        return updates, TorchSGDState(momentum_buffer=buf)

    return optax.GradientTransformationExtraArgs(init, update)


class LARSState(NamedTuple):
    mu: PyTree  # utils.LARS's state name


def lars(
    learning_rate: Schedule,
    weight_decay: Schedule,
    *,
    momentum: float = 0.9,
    eta: float = 0.001,
    decay: PathPredicate = official_decay,
    skipped: SkipPredicate | None = None,
    branch: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """The official utils.LARS (main_dino.py --optimizer lars), with its param groups.

    A parameter with `ndim != 1` gets `d = g + wd * p` (wd = 0 outside the `decay` group)
    scaled by the trust ratio `eta * ||p|| / ||d||` (1 where either norm is 0; Frobenius
    norms over the whole tensor); 1-D parameters (biases, norm scales) get `d = g`. Then
    `mu = momentum * mu + d`, `p -= lr * mu`. Skipped leaves keep value and `mu`.
    """

    def init(params):
        return LARSState(mu=jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None, *, step, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("lars needs params (weight decay and trust ratio)")
        lr = learning_rate(step)
        wd = weight_decay(step)

        def rule(name, g, p, mu):
            d = g
            if p.ndim != 1:  # the official test, not the group: it decides the trust ratio
                if decay(name, p):
                    d = d + wd * p
                p_norm = jnp.linalg.norm(p.astype(jnp.float32))
                d_norm = jnp.linalg.norm(d.astype(jnp.float32))
                ok = (p_norm > 0) & (d_norm > 0)
                q = jnp.where(ok, eta * p_norm / jnp.where(ok, d_norm, 1.0), 1.0)
                d = d * q.astype(d.dtype)
            mu = momentum * mu + d
            return -lr * mu, mu

        updates, mu = leafwise(rule, grads, params, (state.mu,), step, skipped, branch)
        return updates, LARSState(mu=mu)

    return optax.GradientTransformationExtraArgs(init, update)


OPTIMIZERS = ("adamw", "sgd", "lars")  # main_dino.py --optimizer choices


def dino_skipped(schedules: Schedules, norm_last_layer: bool) -> SkipPredicate:
    """The recipe's parameters without gradient: the fixed prototype gains always, the last
    layer while `schedules.last_layer_frozen(step)`."""
    fixed_gain = frozen_weight_g(norm_last_layer)

    def skipped(name, param, step):
        """True, False, or (the last layer) a traced bool of the step."""
        if fixed_gain(name, param):
            return True
        return schedules.last_layer_frozen(step) if is_last_layer(name, param) else False

    return skipped


def dino_optimizer(
    schedules: Schedules,
    *,
    optimizer: str = "adamw",
    clip_grad: float = 3.0,
    norm_last_layer: bool = True,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    branch_updates: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """The official recipe: per-tensor clip, then main_dino.py's `--optimizer` (AdamW with
    its defaults, SGD with momentum 0.9, or utils.LARS with its defaults) with the decay mask
    and the lr/wd schedules; the last layer skipped while epoch < freeze_last_layer, fixed
    gains skipped always. `b1`, `b2`, `eps` are AdamW's. Call
    `update(grads, opt_state, params, step=step)`. `branch_updates`: the frozen last layer
    kept by lax.cond rather than a select (leafwise)."""
    skipped = dino_skipped(schedules, norm_last_layer)
    if optimizer == "adamw":
        rule = torch_adamw(
            schedules.lr,
            schedules.wd,
            b1=b1,
            b2=b2,
            eps=eps,
            skipped=skipped,
            branch=branch_updates,
        )
    elif optimizer == "sgd":
        rule = torch_sgd(schedules.lr, schedules.wd, skipped=skipped, branch=branch_updates)
    elif optimizer == "lars":
        rule = lars(schedules.lr, schedules.wd, skipped=skipped, branch=branch_updates)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    return optax.chain(clip_per_tensor(clip_grad), rule)
