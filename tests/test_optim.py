"""The update rules of dino_jax.optim on tiny arrays, against values derived by hand (and
against torch.optim.SGD where PyTorch is installed)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.parity import train_steps_schedules

from dino_jax.optim import OPTIMIZERS, dino_optimizer, lars, torch_sgd

LR, WD = 0.5, 0.25  # exact in float32: the hand-derived values below are exact too


def const(value):
    return lambda step: jnp.float32(value)


def params():
    return {
        "dense": {
            "kernel": jnp.array([[3.0, 0.0], [0.0, 4.0]]),  # ||p|| = 5
            "bias": jnp.array([1.0, -2.0]),
        },
    }


def grads():
    return {
        "dense": {
            "kernel": jnp.array([[-0.75, 0.0], [0.0, 2.0]]),
            "bias": jnp.array([0.5, 1.0]),
        },
    }


def step(tx, state, g, p, s=0):
    updates, state = tx.update(g, state, p, step=jnp.int32(s))
    return jax.tree.map(lambda a, b: a + b, p, updates), state


def test_sgd_first_step_buffer_is_the_decayed_gradient():
    tx = torch_sgd(const(LR), const(WD))
    p0, g = params(), grads()
    p1, state = step(tx, tx.init(p0), g, p0)
    buf = state.momentum_buffer["dense"]
    # torch clones d = g + wd * p into the buffer at the first update (not 0.1 * d)
    d_kernel = np.array([[-0.75 + 0.75, 0.0], [0.0, 2.0 + 1.0]])
    np.testing.assert_array_equal(buf["kernel"], d_kernel)
    np.testing.assert_array_equal(buf["bias"], g["dense"]["bias"])  # no decay on biases
    np.testing.assert_array_equal(p1["dense"]["kernel"], p0["dense"]["kernel"] - LR * d_kernel)
    np.testing.assert_array_equal(p1["dense"]["bias"], [1.0 - 0.25, -2.0 - 0.5])


def test_sgd_second_step_accumulates_momentum():
    tx = torch_sgd(const(LR), const(WD), momentum=0.5)
    p0, g = params(), grads()
    p1, state = step(tx, tx.init(p0), g, p0)
    p2, state = step(tx, state, g, p1, 1)
    # bias: buf = 0.5 * g + g; p2 = p1 - lr * buf
    np.testing.assert_array_equal(state.momentum_buffer["dense"]["bias"], [0.75, 1.5])
    np.testing.assert_array_equal(
        p2["dense"]["bias"], p1["dense"]["bias"] - LR * 1.5 * g["dense"]["bias"]
    )
    # kernel: d2 = g + wd * p1, buf = 0.5 * d1 + d2
    d1 = np.array([[0.0, 0.0], [0.0, 3.0]])
    d2 = np.asarray(g["dense"]["kernel"]) + WD * np.asarray(p1["dense"]["kernel"])
    np.testing.assert_allclose(state.momentum_buffer["dense"]["kernel"], 0.5 * d1 + d2, rtol=1e-7)


def test_lars_trust_ratio_on_matrices_only():
    eta = 0.3
    tx = lars(const(LR), const(WD), eta=eta)
    p0, g = params(), grads()
    p1, state = step(tx, tx.init(p0), g, p0)
    # kernel: d = g + wd * p = [[0, 0], [0, 3]], ||d|| = 3, ||p|| = 5: q = eta * 5 / 3 = 0.5
    mu = state.mu["dense"]
    np.testing.assert_allclose(mu["kernel"], [[0.0, 0.0], [0.0, 1.5]], rtol=1e-6, atol=0)
    np.testing.assert_allclose(
        p1["dense"]["kernel"], [[3.0, 0.0], [0.0, 4.0 - LR * 1.5]], rtol=1e-6
    )
    # bias (1-D): neither weight decay nor trust ratio, mu = g
    np.testing.assert_array_equal(mu["bias"], g["dense"]["bias"])
    np.testing.assert_array_equal(p1["dense"]["bias"], [1.0 - 0.25, -2.0 - 0.5])


def test_lars_trust_ratio_is_the_ndim_test_not_the_decay_group():
    """A >= 2-D parameter outside the decay group gets no decay but still the trust ratio;
    a 1-D one inside it (a custom mask) gets neither, as utils.LARS's `p.ndim != 1`."""
    eta = 0.5
    tx = lars(const(LR), const(WD), eta=eta, decay=lambda name, p: "bias" in name)
    p0, g = params(), grads()
    _, state = step(tx, tx.init(p0), g, p0)
    # kernel: d = g, ||g|| = sqrt(0.5625 + 4) = 2.136..., q = 0.5 * 5 / ||g||
    gk = np.asarray(g["dense"]["kernel"], np.float64)
    q = eta * 5.0 / np.linalg.norm(gk)
    np.testing.assert_allclose(state.mu["dense"]["kernel"], q * gk, rtol=1e-6)
    np.testing.assert_array_equal(state.mu["dense"]["bias"], g["dense"]["bias"])


def test_lars_zero_norms_give_a_unit_ratio():
    tx = lars(const(LR), const(0.0), eta=0.001)
    zero_p = {"w": jnp.zeros((2, 2)), "v": jnp.array([[1.0, 2.0]])}
    g = {"w": jnp.array([[1.0, -1.0], [2.0, 0.0]]), "v": jnp.zeros((1, 2))}
    p1, state = step(tx, tx.init(zero_p), g, zero_p)
    # ||p|| = 0: q = 1, mu = g; ||d|| = 0: q = 1, mu = 0 (and nothing is NaN)
    np.testing.assert_array_equal(state.mu["w"], g["w"])
    np.testing.assert_array_equal(p1["w"], -LR * np.asarray(g["w"]))
    np.testing.assert_array_equal(state.mu["v"], np.zeros((1, 2)))
    np.testing.assert_array_equal(p1["v"], zero_p["v"])


@pytest.mark.parametrize("make", [torch_sgd, lars], ids=["sgd", "lars"])
def test_skipped_leaf_keeps_value_and_buffer(make):
    skip_kernel_at_1 = lambda name, p, s: (name == "dense/kernel") & (s == 1)
    tx = make(const(LR), const(WD), skipped=skip_kernel_at_1)
    p0, g = params(), grads()
    p1, state1 = step(tx, tx.init(p0), g, p0, 0)
    p2, state2 = step(tx, state1, g, p1, 1)
    (buf1,), (buf2,) = state1, state2  # momentum_buffer / mu
    kernel1 = buf1["dense"]["kernel"]
    assert np.any(np.asarray(kernel1) != 0)
    np.testing.assert_array_equal(buf2["dense"]["kernel"], kernel1)
    np.testing.assert_array_equal(p2["dense"]["kernel"], p1["dense"]["kernel"])
    # the other leaf moved on
    assert np.all(np.asarray(buf2["dense"]["bias"]) != np.asarray(buf1["dense"]["bias"]))
    assert np.all(np.asarray(p2["dense"]["bias"]) != np.asarray(p1["dense"]["bias"]))


def schedules(**kw):
    """train_steps.npz's schedules with a larger learning rate, so that updates show."""
    return dataclasses.replace(train_steps_schedules(), base_lr=0.1, min_lr=1e-3, **kw)


def head_params():
    rng = np.random.default_rng(0)
    return {
        "mlp": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
        "last_layer": {
            "weight_v": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
            "weight_g": jnp.ones((1, 5), jnp.float32),
        },
    }


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_dino_optimizer_freezes_the_last_layer_in_the_first_epoch(name):
    tx = dino_optimizer(schedules(), optimizer=name, clip_grad=3.0, norm_last_layer=True)
    p = head_params()
    g = jax.tree.map(jnp.ones_like, p)
    state = tx.init(p)
    for s in range(3):
        before = p
        p, state = step(tx, state, g, p, s)
        buf = state[1][0]
        ll = buf["last_layer"]
        frozen = s < 2  # epoch 0
        assert np.all(np.asarray(ll["weight_v"]) == 0) == frozen
        np.testing.assert_array_equal(ll["weight_g"], 0.0)  # fixed gains: never an update
        np.testing.assert_array_equal(p["last_layer"]["weight_g"], before["last_layer"]["weight_g"])
        if frozen:
            np.testing.assert_array_equal(
                p["last_layer"]["weight_v"], before["last_layer"]["weight_v"]
            )
    if name == "sgd":
        # its first update (step 2): buf = the clipped gradient (||g|| = sqrt(20) > 3 is
        # clipped per tensor) plus wd * p, not a momentum-damped fraction of it
        gv = np.ones((4, 5))
        gv = gv * 3.0 / (np.linalg.norm(gv) + 1e-6)
        wd = float(schedules().wd(2))
        expected = gv + wd * np.asarray(before["last_layer"]["weight_v"])
        np.testing.assert_allclose(buf["last_layer"]["weight_v"], expected, rtol=1e-6)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="adam") as err:
        dino_optimizer(schedules(), optimizer="adam")
    for choice in OPTIMIZERS:
        assert choice in str(err.value)
    assert set(OPTIMIZERS) == {"adamw", "sgd", "lars"}


def test_sgd_matches_torch_with_groups_and_missing_gradients():
    """torch.optim.SGD(get_params_groups-style groups, lr, momentum=0.9) over 5 steps, with
    the second parameter's gradient None at steps 0 and 1 (its buffer is created at step 2)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    v0 = rng.normal(size=(2, 3)).astype(np.float32)
    b0 = rng.normal(size=4).astype(np.float32)
    gs = [
        {
            k: rng.normal(size=x.shape).astype(np.float32)
            for k, x in [("w", w0), ("v", v0), ("b", b0)]
        }
        for _ in range(5)
    ]
    lrs = [0.0, 0.1, 0.2, 0.15, 0.05]
    wds = [0.01, 0.02, 0.03, 0.04, 0.05]

    tw, tv, tb = (torch.tensor(x, requires_grad=True) for x in (w0, v0, b0))
    opt = torch.optim.SGD(
        [{"params": [tw, tv]}, {"params": [tb], "weight_decay": 0.0}], lr=0, momentum=0.9
    )
    for s, g in enumerate(gs):
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = lrs[s]
        opt.param_groups[0]["weight_decay"] = wds[s]
        for t, k in [(tw, "w"), (tv, "v"), (tb, "b")]:
            t.grad = None if (k == "v" and s < 2) else torch.tensor(g[k])
        opt.step()

    tx = torch_sgd(
        lambda s: jnp.asarray(lrs, jnp.float32)[s],
        lambda s: jnp.asarray(wds, jnp.float32)[s],
        skipped=lambda name, p, s: (name == "v") & (s < 2),
    )
    p = {"w": jnp.asarray(w0), "v": jnp.asarray(v0), "b": jnp.asarray(b0)}
    state = tx.init(p)
    update = jax.jit(lambda g, state, p, s: tx.update(g, state, p, step=s))
    for s, g in enumerate(gs):
        updates, state = update(jax.tree.map(jnp.asarray, g), state, p, jnp.int32(s))
        p = jax.tree.map(lambda a, b: a + b, p, updates)
    for t, k in [(tw, "w"), (tv, "v"), (tb, "b")]:
        np.testing.assert_allclose(p[k], t.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
        buf = opt.state[t]["momentum_buffer"].numpy()
        np.testing.assert_allclose(state.momentum_buffer[k], buf, rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_branch_updates_give_the_select_forms_values_frozen_and_not(name):
    """optim.branch_updates: the frozen last layer kept by lax.cond, the values of the select
    to float32 rounding, across the step that unfreezes it (compiled, as in training; the two
    programs may vectorise a norm's sum differently: LARS's, on some CPUs)."""
    p0 = head_params()
    rng = np.random.default_rng(1)
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p0)
    runs = []
    for branch in (False, True):
        tx = dino_optimizer(schedules(), optimizer=name, branch_updates=branch)
        jitted = jax.jit(lambda st, p, s, tx=tx: tx.update(g, st, p, step=s))
        p, state, seen = p0, tx.init(p0), []
        for s in range(4):  # frozen at steps 0 and 1 (epoch 0), updated at 2 and 3
            updates, state = jitted(state, p, jnp.int32(s))
            p = jax.tree.map(lambda a, b: a + b, p, updates)
            seen.append(jax.device_get((p, state)))
        runs.append(seen)
    for select, branch in zip(*runs, strict=True):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), select, branch
        )
    assert not np.array_equal(
        runs[1][1][0]["last_layer"]["weight_v"], runs[1][2][0]["last_layer"]["weight_v"]
    )
