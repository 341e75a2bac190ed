"""The optimiser updates the donated state in place: no Adam moment is copied by the compiled
train step, while the select form that the branch replaced makes XLA copy the last layer's
(dino_jax/optim.py leafwise; dino_jax/bench/hlo_copies.py)."""

import jax
import jax.numpy as jnp
from helpers.tiny import tiny_config

from dino_jax import optim, parallel
from dino_jax.bench import hlo_copies
from dino_jax.data.pipeline import to_global
from dino_jax.starting_state import initial_state
from dino_jax.trainer import build_run, compile_step


def select_leafwise(rule, grads, params, states, step, skipped):
    """The earlier form: both the new and the old moments computed, one chosen by a select."""

    def leaf(path, g, p, *old):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        active = ~jnp.asarray(skipped(name, p, step))
        u, *new = rule(name, g, p, *old)
        kept = (jnp.where(active, n, o) for n, o in zip(new, old, strict=True))
        return (jnp.where(active, u, 0.0).astype(p.dtype), *kept)

    out = jax.tree_util.tree_map_with_path(leaf, grads, params, *states)
    treedef = jax.tree.structure(grads)
    return tuple(
        jax.tree.unflatten(treedef, [x[i] for x in treedef.flatten_up_to(out)])
        for i in range(1 + len(states))
    )


# the tiny ViT under the official head's hidden and bottleneck sizes: XLA's choice to copy
# depends on the sizes, and at these the select form makes it
HEAD = {"model.out_dim": 4096, "model.head_hidden_dim": 2048, "model.head_bottleneck_dim": 256}


def moment_copies() -> dict[str, int]:
    """The Adam moments the compiled train step copies, with their bytes (the per-tensor step
    counts, int32 scalars, are left out)."""
    # on one device, the GPU case: split over the suite's 8 CPU devices XLA does not copy
    run = build_run(tiny_config(**HEAD), mesh=parallel.make_mesh(jax.devices()[:1]))
    state = initial_state(run)
    batch = to_global(next(run.host_batches()), run.mesh)
    text = compile_step(run).lower(state, batch, jax.random.key(0)).compile().as_text()
    copies = hlo_copies.state_copies(text)
    return {k: v for k, v in copies.items() if k.startswith("state_opt_state") and "count" not in k}


def test_no_adam_moment_is_copied():
    assert moment_copies() == {}


def test_the_select_form_copies_the_last_layers_moments(monkeypatch):
    monkeypatch.setattr(optim, "leafwise", select_leafwise)
    copied = moment_copies()
    assert copied and all("last_layer" in name for name in copied), copied
