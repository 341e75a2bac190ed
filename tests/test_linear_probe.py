"""Linear probe: init, SGD and per-epoch cosine as eval_linear.py, a frozen backbone, end to end."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax.config import default_config
from dino_jax.evaluate import linear, probe
from dino_jax.evaluate.cli import evaluate
from dino_jax.evaluate.weights import load_weights

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKBONE = ROOT / "tests" / "fixtures" / "backbone.pth"


def config(**overrides):
    lin = default_config().linear
    for key, value in overrides.items():
        lin[key] = value
    return lin


def test_defaults_are_the_official_ones():
    lin = default_config().linear
    assert (lin.epochs, lin.lr, lin.batch_size, lin.momentum) == (100, 0.001, 1024, 0.9)
    assert (lin.n_last_blocks, lin.avgpool, tuple(lin.crop_scale)) == (4, False, (0.08, 1.0))
    probe.check_linear(lin, depth=12)
    with pytest.raises(ValueError, match=r"epochs=0(.|\n)*n_last_blocks=4: in \[1, depth=2\]"):
        probe.check_linear(config(epochs=0), depth=2)


def test_learning_rate_is_scaled_and_annealed_once_per_epoch():
    lin = config(lr=0.01, batch_size=512, epochs=4)
    _, schedule = probe.probe_optimizer(lin, steps_per_epoch=3)
    base = 0.01 * 512 / 256
    lrs = np.array([float(schedule(i)) for i in range(12)])
    for epoch in range(4):  # CosineAnnealingLR(T_max=epochs, eta_min=0) stepped per epoch
        expected = base * 0.5 * (1 + np.cos(np.pi * epoch / 4))
        np.testing.assert_allclose(lrs[3 * epoch : 3 * epoch + 3], expected, rtol=1e-6)
    assert lrs[0] == pytest.approx(base) and lrs[-1] > 0


def test_probe_init_is_normal_001_with_zero_bias():
    params = probe.init_probe(jax.random.key(0), 384, 1000)
    assert params["kernel"].shape == (384, 1000) and params["bias"].shape == (1000,)
    assert float(jnp.std(params["kernel"])) == pytest.approx(0.01, rel=0.01)
    assert abs(float(jnp.mean(params["kernel"]))) < 1e-4
    assert not np.any(params["bias"])


def numpy_sgd_reference(w, b, batches, lrs, momentum=0.9):
    """torch.optim.SGD(momentum, dampening 0, no weight decay) on mean cross-entropy."""
    buf_w, buf_b = None, None
    for (x, y), lr in zip(batches, lrs, strict=True):
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1.0
        g_w, g_b = x.T @ p / len(y), p.mean(0)
        buf_w = g_w if buf_w is None else momentum * buf_w + g_w
        buf_b = g_b if buf_b is None else momentum * buf_b + g_b
        w, b = w - lr * buf_w, b - lr * buf_b
    return w, b


def test_sgd_steps_match_pytorch_sgd_with_momentum():
    rng = np.random.default_rng(0)
    dim, classes, batch = 6, 4, 8
    lin = config(lr=0.5, batch_size=batch, epochs=3)
    tx, schedule = probe.probe_optimizer(lin, steps_per_epoch=2)
    params = probe.init_probe(jax.random.key(1), dim, classes)
    state = probe.init_state(params, tx)
    update = jax.jit(functools.partial(probe.probe_update, tx=tx))
    batches = [(rng.normal(size=(batch, dim)), rng.integers(0, classes, batch)) for _ in range(6)]
    for x, y in batches:
        state, _ = update(state, x.astype(np.float32), y, np.ones(batch, bool))
    lrs = [float(schedule(i)) for i in range(6)]
    assert lrs[1] == lrs[0] > lrs[2] == lrs[3] > lrs[4]
    w, b = numpy_sgd_reference(
        np.asarray(params["kernel"], np.float64), np.zeros(classes), batches, lrs
    )
    np.testing.assert_allclose(state.params["kernel"], w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.params["bias"], b, rtol=1e-4, atol=1e-6)
    assert int(state.step) == 6


def test_padding_rows_do_not_count():
    rng = np.random.default_rng(0)
    params = probe.init_probe(jax.random.key(0), 5, 3)
    x, y = rng.normal(size=(6, 5)).astype(np.float32), np.array([0, 1, 2, 0, -1, -1])
    mask = y >= 0
    full = probe.probe_loss(params, x, y, mask)
    np.testing.assert_allclose(full, probe.probe_loss(params, x[:4], y[:4], mask[:4]), rtol=1e-6)
    assert probe.accuracy(params, x[:4], y[:4])[1] == 100.0  # top-min(5, 3): every class


def test_probe_learns_an_easy_separable_problem():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3.0

    def sample(n):
        y = rng.integers(0, 4, n)
        return (centres[y] + rng.normal(size=(n, 16))).astype(np.float32), y

    (train_x, train_y), (val_x, val_y) = sample(2048), sample(512)
    lin = config(lr=0.1, batch_size=256, epochs=5)
    result = probe.fit_features(train_x, train_y, val_x, val_y, lin)
    assert len(result.per_epoch) == 5
    assert result.best_top1 == max(r["val/top1"] for r in result.per_epoch)
    assert result.best_top1 > 95.0  # chance is 25%
    assert result.per_epoch[-1]["train/loss"] < result.per_epoch[0]["train/loss"]
    untrained = probe.init_probe(jax.random.key(0), 16, 4)
    assert probe.accuracy(untrained, val_x, val_y)[0] < 70.0


@pytest.fixture(scope="module")
def official():
    return load_weights(BACKBONE, num_heads=2)


def test_the_backbone_is_frozen(official):
    backbone, variables, _ = official
    lin = config(batch_size=4, epochs=1)
    tx, _ = probe.probe_optimizer(lin, 1)
    state = probe.init_state(probe.init_probe(jax.random.key(0), 64, 10), tx)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8),
        "size": np.array([[24, 24], [20, 24], [24, 12], [16, 16]], np.int32),
        "label": np.array([1, 2, 3, 4], np.int32),
    }
    step = functools.partial(
        linear.train_step,
        backbone=backbone,
        tx=tx,
        num_classes=10,
        crop=16,
        scale=(0.08, 1.0),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        n_last_blocks=2,
        avgpool=False,
    )

    key = jax.random.key(3)

    def loss_of(v):
        return step(state, v, batch, key)[1]["loss"]

    grads, (new, out) = jax.jit(lambda v: (jax.grad(loss_of)(v), step(state, v, batch, key)))(
        variables
    )
    assert all(not np.any(g) for g in jax.tree.leaves(grads))
    assert np.isfinite(out["loss"]) and int(out["out_of_range"]) == 0
    assert np.any(np.asarray(new.params["kernel"]) != np.asarray(state.params["kernel"]))


def test_train_transform_crops_flips_and_normalises():
    # At scale (1, 1) the only box of a square image is all of it, and a same-size PIL bicubic
    # resample is exact: each output is the image or its mirror image.
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    transform = functools.partial(
        linear.train_transform,
        crop=16,
        scale=(1.0, 1.0),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        dtype=jnp.float32,
    )
    out = np.asarray(jax.jit(transform)(images, np.full((8, 2), 16), jax.random.key(0)))
    plain = (images / 255.0 - 0.5) / 0.25
    flipped = [np.allclose(o, p[:, ::-1], atol=1e-5) for o, p in zip(out, plain, strict=True)]
    kept = [np.allclose(o, p, atol=1e-5) for o, p in zip(out, plain, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 8


def test_linear_command_end_to_end(tmp_path):
    result = evaluate(
        [
            "linear",
            "--weights",
            str(BACKBONE),
            "--num_heads",
            "2",
            "--config",
            str(ROOT / "configs" / "demo.py"),
            "--config.eval.resize=32",
            "--config.eval.crop=32",
            "--config.linear.epochs=2",
            "--config.linear.batch_size=64",
            "--config.linear.steps_per_epoch=4",
            "--config.linear.n_last_blocks=2",
            "--config.linear.avgpool=true",
            "--config.linear.lr=0.05",
            "--out",
            str(tmp_path),
        ]
    )
    assert result["feature_dim"] == 32 * 3 and result["num_classes"] == 10
    assert [r["epoch"] for r in result["per_epoch"]] == [0, 1]
    assert result["best_top1"] == max(r["val/top1"] for r in result["per_epoch"])
    assert 0.0 <= result["best_top1"] <= 100.0
    base = 0.05 * 64 / 256
    assert [r["lr"] for r in result["per_epoch"]] == pytest.approx([base, base / 2])
    saved = json.loads((tmp_path / "linear.json").read_text())
    assert saved["best_top1"] == result["best_top1"] and saved["linear"]["epochs"] == 2
    probe = np.load(tmp_path / "linear_probe.npz")
    assert probe["kernel"].shape == (96, 10)


def test_probe_classes_are_the_banks_when_validation_lacks_the_last(tmp_path):
    # Folder labels of the validation split are bank indices: a split without the bank's last
    # class must not shrink the probe below the bank's classes.
    for split, classes in (("train", "abc"), ("val", "ab")):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
    data = default_config().data
    data.source, data.data_dir, data.eval_train_split = "folder", str(tmp_path), "train"
    assert linear.bank_class_count(data) == 3
    data.source = "demo"
    assert linear.bank_class_count(data) == 0
