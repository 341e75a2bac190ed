"""Three official ResNet training steps with SGD and with LARS, reproduced in float32.

tests/fixtures/resnet_train_steps.npz (main_dino.py --arch resnet50 --optimizer sgd) and
lars_steps.npz (--optimizer lars): a small torchvision Bottleneck ResNet (stem 4, widths
4/8/16/32, one block per stage), a DINOHead without BatchNorm, 2 global 48 px and 2 local
24 px crops of 4 images, 2 iterations per epoch (the last layer frozen in epoch 0). Checked
after every step: loss and schedules, per-tensor gradient norms, student and teacher
parameters, the BatchNorm running statistics of both networks (the teacher's from its own
batches, not EMA'd), num_batches_tracked, the momentum buffers and the center.

Bounds: 20x how far the official float32 result is from the same computation in float64 (the
fixture's `max_abs_dev_float32_vs_float64`) for parameters, running statistics and the
center; relative 1e-5 on the loss and 1e-4 on gradient norms and momentum buffers (sums of
clipped gradients); 1e-2 on each tensor's change since the start. Three plausible mistakes
fail them: the teacher's running statistics as an EMA, LARS's trust ratio on 1-D parameters,
SGD without weight decay in the momentum.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.parity import run_updates

from dino_jax.interop.state_dict import from_state_dict, to_state_dict
from dino_jax.models import DINOHead, MultiCropNetwork
from dino_jax.models.resnet import ResNet
from dino_jax.optim import clip_per_tensor, dino_optimizer, frozen_weight_g, is_last_layer, lars
from dino_jax.schedules import Schedules
from dino_jax.state import create_state, ema
from dino_jax.train_step import DinoHParams

N_STEPS = 3
OUT_DIM = 64
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4  # gradient norms, and ||ours - official|| / ||official|| of each buffer
DELTA_RTOL = 1e-2  # ||change ours - change official|| / ||change official|| per tensor
# Tensors whose change is compared: the student's that moved by > 1e-5; the teacher's by
# > 1e-4 (its EMA moves values of ~1 by a few hundred float32 ulps, and the rounding of the
# stored value alone is then ~1% of the change).
MOVED = {"student": 1e-5, "teacher": 1e-4}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
NETWORKS = (("student", "module."), ("teacher", ""))

FIXTURES = {
    # file, optimizer state name, the run's --lr, --weight_decay, --weight_decay_end
    "sgd": ("resnet_train_steps.npz", "momentum_buffer", 0.03, 1e-4, 1e-4),
    "lars": ("lars_steps.npz", "mu", 1.0, 0.04, 0.4),
}


def schedules(optimizer: str) -> Schedules:
    """The fixture run's schedules: batch 4, 2 iterations per epoch, 10 epochs."""
    _, _, lr, wd, wd_end = FIXTURES[optimizer]
    return Schedules(
        steps_per_epoch=2,
        epochs=10,
        base_lr=lr * 4 / 256,
        min_lr=1e-6,
        warmup_epochs=1,
        weight_decay=wd,
        weight_decay_end=wd_end,
        momentum_teacher=0.996,
        teacher_temp=0.04,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        freeze_last_layer=1,
    )


def network() -> MultiCropNetwork:
    return MultiCropNetwork(
        backbone=ResNet(stem_width=4, widths=(4, 8, 16, 32), depths=(1, 1, 1, 1)),
        head=DINOHead(out_dim=OUT_DIM, hidden_dim=32, bottleneck_dim=16),
    )


def record_grads() -> optax.GradientTransformation:
    """Passes the gradients on unchanged and keeps them (before clipping) as its state."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (grads, grads),
    )


def official_tx(optimizer: str, sch: Schedules):
    return dino_optimizer(sch, optimizer=optimizer, clip_grad=3.0, norm_last_layer=True)


def fixture_state(data, tx):
    """The fixture's initial state: params and batch_stats of each network, center zeros."""
    trees = {}
    for which, prefix in NETWORKS:
        full = f"{which}/{prefix}"
        state = {k[6:]: data[k] for k in data if k.startswith("param/" + full)}
        trees[which] = jax.tree.map(jnp.asarray, from_state_dict(state, full))
    (student, s_stats), (teacher, t_stats) = trees["student"], trees["teacher"]
    return create_state(student, tx, OUT_DIM, s_stats).replace(
        teacher=teacher, teacher_stats=t_stats
    )


def run_official_steps(data, optimizer):
    """The fixture's steps through dino_update, with the official optimizer; the gradients
    of each step are kept in opt_state[0]."""
    sch = schedules(optimizer)
    tx = optax.chain(record_grads(), official_tx(optimizer, sch))
    hp = DinoHParams(model=network(), tx=tx, schedules=sch)
    return run_updates(hp, fixture_state(data, tx), data, N_STEPS)


def bound(data, key: str) -> float:
    """20x how far the official float32 output is from the same computation in float64."""
    return 20 * json.loads(str(data["meta"]))["max_abs_dev_float32_vs_float64"][key]


def max_abs_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)))


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def official(data, s, which, name):
    return data[f"out/step{s}/{which}/{name}"]


def param_errors(data, params_after, params_before, which, prefix, s) -> dict:
    """Worst |ours - official| of one network's parameters after step s, in units of the
    bound, and the worst relative error of their change (tensors moved > MOVED)."""
    ours = to_state_dict(jax.device_get(params_after), prefix)
    before = to_state_dict(jax.device_get(params_before), prefix)
    tol = bound(data, f"out/step{s}/{which}/* (params)")
    worst = {"abs": 0.0, "abs_per_bound": 0.0, "delta": 0.0, "n_delta": 0}
    for name, value in ours.items():
        ref = official(data, s, which, name)
        err = max_abs_err(value, ref)
        worst["abs"] = max(worst["abs"], err)
        # a zero bound (step 0: lr = 0, and the EMA of equal weights) asks for exact values
        per_bound = err / tol if tol else (0.0 if err == 0 else np.inf)
        worst["abs_per_bound"] = max(worst["abs_per_bound"], per_bound)
        delta_ref = ref - before[name]
        if np.max(np.abs(delta_ref)) > MOVED[which]:
            worst["delta"] = max(worst["delta"], rel_err(value - before[name], delta_ref))
            worst["n_delta"] += 1
    return worst


def stats_error(data, stats, which, prefix, s) -> float:
    """Worst running-statistics error of one network after step s, in units of the bound;
    num_batches_tracked must be exact (the student's backbone runs twice a step: global,
    then local crops)."""
    ours = to_state_dict({}, prefix, batch_stats=jax.device_get(stats))
    names = {
        k.split("/", 3)[3]
        for k in data
        if k.startswith(f"out/step{s}/{which}/") and k.rsplit(".", 1)[1] in BUFFERS
    }
    assert names == set(ours), which
    tol = bound(data, f"out/step{s}/{which}/* (BN running stats)")
    worst = 0.0
    for name in names:
        ref = official(data, s, which, name)
        if name.endswith("num_batches_tracked"):
            assert int(ours[name]) == int(ref) == (s + 1) * (2 if which == "student" else 1)
        else:
            worst = max(worst, max_abs_err(ours[name], ref) / tol)
    return worst


def buffer_error(data, opt_state, key, s) -> float:
    """Worst ||ours - official|| / ||official|| of the momentum buffers after step s. PyTorch
    has no state for the last layer before its first update (step 2), nor ever for the fixed
    gains: ours must be zero there."""
    ours = to_state_dict(jax.device_get(getattr(opt_state, key)), "module.")
    names = {k.split("/", 3)[3] for k in data if k.startswith(f"out/step{s}/{key}/")}
    frozen = {"module.head.last_layer.weight_g"}
    if s < 2:
        frozen.add("module.head.last_layer.weight_v")
    assert names == set(ours) - frozen, s
    for name in frozen:
        np.testing.assert_array_equal(ours[name], 0.0, err_msg=name)
    return max(rel_err(ours[name], data[f"out/step{s}/{key}/{name}"]) for name in names)


@pytest.fixture(scope="module")
def runs(fixtures_dir):
    """optimizer -> (fixture data, states, metrics) of its official run, computed once."""
    done = {}

    def get(optimizer):
        if optimizer not in done:
            with np.load(fixtures_dir / FIXTURES[optimizer][0]) as f:
                data = {k: f[k] for k in f.files}
            done[optimizer] = (data, *run_official_steps(data, optimizer))
        return done[optimizer]

    return get


@pytest.fixture(params=list(FIXTURES))
def case(request, runs):
    return request.param, *runs(request.param)


def test_loss_and_schedules_per_step(case):
    _, data, _, metrics = case
    for s, m in enumerate(metrics):
        np.testing.assert_allclose(m["train/loss"], data[f"out/step{s}/loss"], rtol=LOSS_RTOL)
        for key in ("lr", "wd", "momentum", "teacher_temp"):
            np.testing.assert_allclose(
                m[f"train/{key}"], data[f"out/step{s}/{key}"], rtol=1e-6, atol=1e-12, err_msg=key
            )


def test_grad_norms_per_step(case):
    """utils.clip_gradients's norms (before clipping), for every parameter with a gradient,
    the frozen last layer included (it is cancelled after the clip)."""
    _, data, states, _ = case
    names = json.loads(str(data["meta"]))["grad_norm_names_per_step"]
    for s in range(N_STEPS):
        norms = jax.tree.map(jnp.linalg.norm, states[s + 1].opt_state[0])
        ours = to_state_dict(jax.device_get(norms), "module.")
        np.testing.assert_allclose(
            [ours[n] for n in names[s]], data[f"out/step{s}/grad_norms"], rtol=GRAD_RTOL
        )


def test_student_and_teacher_params_per_step(case):
    _, data, states, _ = case
    n_delta = 0
    for s in range(N_STEPS):
        for which, prefix in NETWORKS:
            after, before = getattr(states[s + 1], which), getattr(states[0], which)
            worst = param_errors(data, after, before, which, prefix, s)
            assert worst["abs_per_bound"] <= 1.0, (s, which, worst)
            assert worst["delta"] <= DELTA_RTOL, (s, which, worst)
            n_delta += worst["n_delta"]
    assert n_delta > 0
    # lr = 0 at step 0: the student is exactly as it was
    for a, b in zip(*(jax.tree.leaves(x.student) for x in states[:2]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_batchnorm_running_stats_per_step(case):
    _, data, states, _ = case
    for s in range(N_STEPS):
        for which, prefix in NETWORKS:
            err = stats_error(data, getattr(states[s + 1], f"{which}_stats"), which, prefix, s)
            assert err <= 1.0, (s, which, err)


def test_momentum_buffers_and_center_per_step(case):
    optimizer, data, states, _ = case
    key = FIXTURES[optimizer][1]
    for s in range(N_STEPS):
        rule_state = states[s + 1].opt_state[1][1]  # (recorded grads, (clip, rule))
        assert buffer_error(data, rule_state, key, s) <= GRAD_RTOL, s
        center_err = max_abs_err(states[s + 1].center, data[f"out/step{s}/center"])
        assert center_err <= bound(data, f"out/step{s}/center"), (s, center_err)


# ---- plausible mistakes: each fails a bound the official step meets ----


def replay(tx, states, n_steps=2):
    """The states (params, optimizer state) of a run with `tx` in place of the official
    optimizer, for the first two steps: lr = 0 at step 0 leaves the parameters exactly as
    they were, so both steps see exactly the gradients of the official run."""
    params = states[0].student
    opt_state = tx.init(params)
    out = []
    for s in range(n_steps):
        grads = states[s + 1].opt_state[0]
        updates, opt_state = tx.update(grads, opt_state, params, step=jnp.int32(s))
        params = optax.apply_updates(params, updates)
        out.append((params, opt_state))
    return out


def test_teacher_stats_as_an_ema_would_fail(case):
    """The teacher's running statistics as an EMA of the student's (an EMA over the whole
    state_dict) instead of the teacher's own batch statistics. The running statistics never
    feed a train-mode forward, so that run differs from the official one in them alone."""
    _, data, states, metrics = case
    stats = states[0].teacher_stats
    worst = 0.0
    for s in range(N_STEPS):
        m = metrics[s]["train/momentum"]
        mixed = ema(stats, states[s + 1].student_stats, m)
        stats = jax.tree.map(  # counts are counted, not averaged
            lambda x, own: own if own.dtype == jnp.int32 else x, mixed, states[s + 1].teacher_stats
        )
        worst = max(worst, stats_error(data, stats, "teacher", "", s))
    assert worst > 100, worst  # in units of the bound the official step meets


def as_matrices(tx):
    """tx seeing every 1-D parameter as a (1, n) matrix."""
    to2d = lambda t: jax.tree.map(lambda x: x.reshape(1, -1) if x.ndim == 1 else x, t)

    def update(grads, state, params=None, **extra):
        updates, state = tx.update(to2d(grads), state, to2d(params), **extra)
        return jax.tree.map(lambda u, p: u.reshape(p.shape), updates, params), state

    return optax.GradientTransformationExtraArgs(lambda params: tx.init(to2d(params)), update)


def test_lars_trust_ratio_on_1d_params_would_fail(runs):
    """utils.LARS without its `p.ndim != 1` test: biases and BN parameters get the trust
    ratio too (weight decay stays on the official group)."""
    data, states, _ = runs("lars")
    sch = schedules("lars")
    fixed = frozen_weight_g(True)

    def skipped(name, p, step):
        return jnp.logical_or(fixed(name, p), is_last_layer(name, p) & sch.last_layer_frozen(step))

    decay = lambda name, p: not name.endswith(("bias", "scale"))
    rule = as_matrices(lars(sch.lr, sch.wd, decay=decay, skipped=skipped))
    for tx, wrong in [
        (official_tx("lars", sch), False),
        (optax.chain(clip_per_tensor(3.0), rule), True),
    ]:
        params, _ = replay(tx, states)[1]
        worst = param_errors(data, params, states[0].student, "student", "module.", 1)
        if wrong:
            assert worst["abs_per_bound"] > 100 and worst["delta"] > DELTA_RTOL, worst
        else:  # the replay itself is faithful
            assert worst["abs_per_bound"] <= 1 and worst["delta"] <= DELTA_RTOL, worst


def test_sgd_without_weight_decay_would_fail(runs):
    """torch.optim.SGD fed the bare gradient (d = g, no wd * p): with the RN50 recipe's
    wd = 1e-4 the parameters hardly notice, the momentum buffers do."""
    data, states, _ = runs("sgd")
    sch = schedules("sgd")
    no_decay = dataclasses.replace(sch, weight_decay=0.0, weight_decay_end=0.0)
    for run_sch, wrong in [(sch, False), (no_decay, True)]:
        replayed = replay(official_tx("sgd", run_sch), states)
        errors = [
            buffer_error(data, opt_state[1], "momentum_buffer", s)
            for s, (_, opt_state) in enumerate(replayed)
        ]
        if wrong:
            assert min(errors) > GRAD_RTOL, errors
        else:  # the replay itself is faithful
            assert max(errors) <= GRAD_RTOL, errors
