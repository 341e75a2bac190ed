"""optim.flat_state: the student, the teacher and the optimiser's moments held, while the run
steps, as one flat vector per update group, so that the update, the clip's scaling and the
EMA run as a few large kernels, not a few per tensor.

A group is the tensors the recipe treats alike at every step (dino_jax.optim): decayed or
not, and updated always, never (the fixed prototype gains) or only once the last layer is
unfrozen. Inside a group every element gets PyTorch's arithmetic of its own tensor, and one
step count serves the group, since the counts of its tensors advance together. The per-tensor
clip stays per tensor: each gradient is scaled by its own norm as it is copied into its
group's vector. LARS (a trust ratio per tensor) has no flat form here.

Checkpoints, evaluation and export see the usual per-tensor state: the training loop converts
on restore (`to_flat`) and before a save or an evaluation (`to_tree`), so a resumed run may
switch the option either way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dino_jax import optim
from dino_jax.schedules import Schedules
from dino_jax.state import TrainState

PyTree = Any
FLAT_OPTIMIZERS = ("adamw", "sgd")


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one tensor lives: its group's vector, from `offset`, with `shape`."""

    group: str
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class Group(NamedTuple):
    """A group of tensors: its name (its vector's key), whether it is decayed, and its first
    tensor's path and shape, which the skip rule is asked about for the whole group."""

    name: str
    decays: bool
    first_name: str
    first_leaf: Any


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """The tensors of a parameter tree laid out in flat vectors, one per group (static)."""

    treedef: Any
    slots: tuple[Slot, ...]  # in the tree's leaf order
    groups: tuple[Group, ...]  # in first-use order

    @classmethod
    def of(cls, params: PyTree, group_of) -> FlatLayout:
        """The layout of `params` (arrays or shapes); `group_of(name, leaf)`: a leaf's group
        key, (its group's name, whether it is decayed)."""
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        sizes: dict[str, int] = {}
        groups: dict[str, Group] = {}
        slots = []
        for path, leaf in leaves:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            kind, decays = group_of(name, leaf)
            group = f"{kind}/{'decay' if decays else 'no_decay'}/{jnp.dtype(leaf.dtype).name}"
            shape = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
            groups.setdefault(group, Group(group, decays, name, shape))
            offset = sizes.get(group, 0)
            slots.append(Slot(group, offset, tuple(leaf.shape)))
            sizes[group] = offset + math.prod(leaf.shape)
        return cls(treedef, tuple(slots), tuple(groups.values()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def flatten(self, tree: PyTree, groups=None) -> dict[str, jax.Array]:
        """`tree`'s tensors concatenated into their groups' vectors (only `groups` if given)."""
        leaves = self.treedef.flatten_up_to(tree)
        wanted = self.names if groups is None else groups
        return {
            g: jnp.concatenate(
                [x.reshape(-1) for x, s in zip(leaves, self.slots, strict=True) if s.group == g]
            )
            for g in wanted
        }

    def unflatten(self, buffers: dict[str, jax.Array]) -> PyTree:
        """The tree of tensors `buffers` hold (slices of the group vectors)."""
        leaves = [
            jax.lax.slice_in_dim(buffers[s.group], s.offset, s.offset + s.size).reshape(s.shape)
            for s in self.slots
        ]
        return self.treedef.unflatten(leaves)

    def first_of_each(self, tree: PyTree) -> dict[str, Any]:
        """One leaf of `tree` per group: the first in the tree's order."""
        leaves = self.treedef.flatten_up_to(tree)
        first: dict[str, Any] = {}
        for x, s in zip(leaves, self.slots, strict=True):
            first.setdefault(s.group, x)
        return first

    def per_leaf(self, values: dict[str, Any]) -> PyTree:
        """A tree with each leaf its group's value from `values`."""
        return self.treedef.unflatten([values[s.group] for s in self.slots])


@struct.dataclass
class FlatParams:
    """A parameter tree held as its groups' flat vectors (a pytree of those vectors)."""

    buffers: dict[str, jax.Array]
    layout: FlatLayout = struct.field(pytree_node=False)

    def tree(self) -> PyTree:
        return self.layout.unflatten(self.buffers)


def as_tree(params: PyTree | FlatParams) -> PyTree:
    """The parameter tree of `params`, flat or not."""
    return params.tree() if isinstance(params, FlatParams) else params


def recipe_group(skipped: optim.SkipPredicate):
    """A parameter's group key under the recipe's rules: when `skipped` skips it (always,
    never, or at some steps: its answer for step 0 is then an array), and whether it is
    decayed (dino_jax.optim.official_decay)."""

    def group_of(name: str, leaf) -> tuple[str, bool]:
        skip = skipped(name, leaf, jnp.zeros([], jnp.int32))
        kind = ("updated", "fixed")[skip] if isinstance(skip, bool) else "some_steps"
        return kind, optim.official_decay(name, leaf)

    return group_of


@dataclasses.dataclass(frozen=True)
class FlatOptimizer:
    """dino_jax.optim.dino_optimizer's AdamW or SGD, on flat groups (static; hashable)."""

    layout: FlatLayout
    schedules: Schedules
    skipped: optim.SkipPredicate  # optim.dino_skipped: the layout's groups were made by it
    optimizer: str = "adamw"
    clip_grad: float = 3.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    branch: bool = False

    def update(self, grads: PyTree, opt_state, params: FlatParams, *, step: jax.Array):
        """(updates as FlatParams, new flat optimiser state) from the per-tensor `grads`, as
        `dino_optimizer(...).update(grads, opt_state, params, step=step)` per tensor."""
        clip_state, rule_state = opt_state
        if self.clip_grad:
            grads = jax.tree.map(lambda g: optim.clip_tensor(g, self.clip_grad), grads)
        skips = {g.name: self.skipped(g.first_name, g.first_leaf, step) for g in self.layout.groups}
        moving = [name for name, skip in skips.items() if skip is not True]
        flat_grads = self.layout.flatten(grads, moving)
        lr, wd = self.schedules.lr(step), self.schedules.wd(step)
        fields = rule_state._fields
        updates, new_state = {}, {f: {} for f in fields}
        for group in self.layout.groups:
            p = params.buffers[group.name]
            old = tuple(getattr(rule_state, f)[group.name] for f in fields)
            out = optim.guarded(
                skips[group.name],
                self._rule(lr, wd, group.decays, flat_grads.get(group.name), p, old),
                lambda p=p, old=old: (jnp.zeros_like(p), *old),  # as PyTorch's skip
                self.branch,
            )
            updates[group.name] = out[0]
            for f, value in zip(fields, out[1:], strict=True):
                new_state[f][group.name] = value
        return (
            FlatParams(updates, self.layout),
            (clip_state, type(rule_state)(**new_state)),
        )

    def _rule(self, lr, wd, decays: bool, g, p, old):
        """The update of one group, as a function of nothing (for optim.guarded)."""

        def step_group():
            if self.optimizer == "adamw":
                hyper = optim.AdamWHyper(lr, wd, self.b1, self.b2, self.eps)
                u, *new = optim.adamw_rule(hyper, decays, g, p, *old)
            else:
                u, *new = optim.sgd_rule(lr, wd, optim.SGD_MOMENTUM, decays, g, p, *old)
            return (u.astype(p.dtype), *new)

        return step_group

    def to_flat(self, state: TrainState) -> TrainState:
        """`state` (per tensor) with the student, the teacher and the optimiser's state in
        the flat groups; a group's step count is its first tensor's (`count_mismatches`
        finds the states where its tensors' counts differ)."""
        clip_state, rule_state = state.opt_state
        flat_rule = {
            f: self.layout.first_of_each(v) if f == "count" else self.layout.flatten(v)
            for f, v in rule_state._asdict().items()
        }
        return state.replace(
            student=FlatParams(self.layout.flatten(state.student), self.layout),
            teacher=FlatParams(self.layout.flatten(state.teacher), self.layout),
            opt_state=(clip_state, type(rule_state)(**flat_rule)),
        )

    def to_tree(self, state: TrainState) -> TrainState:
        """The per-tensor state of a flat `state` (to_flat's inverse)."""
        clip_state, rule_state = state.opt_state
        tree_rule = {
            f: self.layout.per_leaf(v) if f == "count" else self.layout.unflatten(v)
            for f, v in rule_state._asdict().items()
        }
        return state.replace(
            student=state.student.tree(),
            teacher=state.teacher.tree(),
            opt_state=(clip_state, type(rule_state)(**tree_rule)),
        )

    def count_mismatches(self, state: TrainState) -> list[str]:
        """The groups of a per-tensor `state` whose tensors' step counts differ (host side)."""
        rule_state = state.opt_state[1]
        if "count" not in rule_state._fields:
            return []
        counts = jax.device_get(self.layout.treedef.flatten_up_to(rule_state.count))
        seen: dict[str, set] = {}
        for c, s in zip(counts, self.layout.slots, strict=True):
            seen.setdefault(s.group, set()).add(int(np.asarray(c)))
        return [g for g, values in seen.items() if len(values) > 1]


def flat_optimizer(
    params: PyTree,
    schedules: Schedules,
    *,
    optimizer: str,
    clip_grad: float,
    norm_last_layer: bool,
    branch_updates: bool = False,
) -> FlatOptimizer:
    """The recipe's optimiser (as dino_jax.recipe.build_optimizer) on the flat groups of
    `params` (arrays or shapes: the student's)."""
    if optimizer not in FLAT_OPTIMIZERS:
        raise ValueError(
            f"optim.flat_state has no {optimizer!r}: use {' or '.join(FLAT_OPTIMIZERS)}"
        )
    skipped = optim.dino_skipped(schedules, norm_last_layer)
    return FlatOptimizer(
        FlatLayout.of(params, recipe_group(skipped)),
        schedules,
        skipped,
        optimizer=optimizer,
        clip_grad=clip_grad,
        branch=branch_updates,
    )
