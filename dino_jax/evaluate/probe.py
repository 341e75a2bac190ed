"""A linear classifier on fixed features, as eval_linear.py trains and scores it: N(0, 0.01)
init, SGD with momentum and an epoch-wise cosine, best validation top-1 over epochs. The
end-to-end protocol over augmented crops of a frozen backbone is in `linear.py`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from dino_jax.validation_eval import linear_errors

_EVAL_CHUNK = 8192  # validation rows scored per call


def check_linear(lin: ml_collections.ConfigDict, depth: int | None = None) -> None:
    """ValueError listing every unusable key of a `config.linear` section."""
    errors = linear_errors(lin, depth)
    if errors:
        raise ValueError("invalid linear-probe config:\n  - " + "\n  - ".join(errors))


@struct.dataclass
class ProbeState:
    step: jax.Array  # int32 scalar
    params: dict[str, jax.Array]  # {"kernel": (D, C), "bias": (C,)}
    opt_state: optax.OptState


@dataclasses.dataclass
class LinearResult:
    best_top1: float
    best_epoch: int
    per_epoch: list[dict[str, float]]  # epoch, lr, train/loss, val/top1, val/top5
    params: dict[str, np.ndarray]  # the probe after the last epoch
    feature_dim: int
    num_classes: int

    def metrics(self) -> dict[str, float]:
        return {"linear/top1": self.best_top1, "linear/best_epoch": float(self.best_epoch)}


# ----------------------------------------------------------------------------- the probe


def init_probe(key: jax.Array, dim: int, num_classes: int) -> dict[str, jax.Array]:
    """nn.Linear re-initialised as eval_linear's LinearClassifier: N(0, 0.01) weights, 0 bias."""
    kernel = 0.01 * jax.random.normal(key, (dim, num_classes), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def probe_logits(params: dict[str, jax.Array], feats: jax.Array) -> jax.Array:
    return jnp.dot(feats, params["kernel"], precision="highest") + params["bias"]


def epoch_cosine(base_lr: float, epochs: int, steps_per_epoch: int):
    """CosineAnnealingLR(T_max=epochs, eta_min=0) stepped once per epoch, as eval_linear does:
    constant within an epoch, base_lr * (1 + cos(pi e / epochs)) / 2 in epoch e."""

    def schedule(count):
        epoch = jnp.minimum(count // steps_per_epoch, epochs)
        return base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))

    return schedule


def probe_optimizer(lin: ml_collections.ConfigDict, steps_per_epoch: int):
    """PyTorch SGD with momentum (buf = m buf + g; p -= lr buf) is optax.sgd's trace."""
    base_lr = lin.lr * lin.batch_size / 256.0  # linear scaling rule of eval_linear.py
    schedule = epoch_cosine(base_lr, lin.epochs, steps_per_epoch)
    return optax.sgd(schedule, momentum=lin.momentum), schedule


def init_state(params: dict[str, jax.Array], tx) -> ProbeState:
    return ProbeState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params))


def probe_loss(params, feats: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Cross-entropy averaged over the real rows of a (possibly padded) batch."""
    logits = probe_logits(params, feats)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def probe_update(
    state: ProbeState, feats: jax.Array, labels: jax.Array, mask: jax.Array, *, tx
) -> tuple[ProbeState, jax.Array]:
    """One SGD step of the probe on fixed features (which receive no gradient)."""
    loss, grads = jax.value_and_grad(probe_loss)(
        state.params, jax.lax.stop_gradient(feats), labels, mask
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss


@functools.partial(jax.jit, static_argnames=("k",))
def _hits(params, feats, labels, k: int) -> jax.Array:
    ranked = jax.lax.top_k(probe_logits(params, feats), k)[1]
    correct = ranked == labels[:, None]  # padding rows have label -1: no hit
    return jnp.stack([jnp.sum(correct[:, 0]), jnp.sum(jnp.any(correct, axis=1))])


def accuracy(params, feats: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Top-1 and top-5 (top-min(5, C)) accuracy in percent, as eval_linear's validate."""
    params = jax.tree.map(np.asarray, jax.device_get(params))
    k = min(5, params["bias"].shape[0])
    chunk = min(_EVAL_CHUNK, len(labels))
    hits = np.zeros(2, np.int64)
    for start in range(0, len(labels), chunk):
        x, y = feats[start : start + chunk], labels[start : start + chunk]
        pad = chunk - len(y)  # one shape for every chunk: one compilation
        x = np.pad(x, [(0, pad), (0, 0)])
        y = np.pad(y, (0, pad), constant_values=-1)
        hits += np.asarray(_hits(params, x, y, k))
    top1, top5 = 100.0 * hits / len(labels)
    return float(top1), float(top5)


# ----------------------------------------------------------------------------- loops


def fit_features(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    lin: ml_collections.ConfigDict,
) -> LinearResult:
    """The probe's optimisation on precomputed features (no augmentation, so not the official
    protocol): same init, SGD, schedule and scoring; batches of a fresh permutation per epoch."""
    check_linear(lin)
    num_classes = lin.num_classes or int(max(train_y.max(), val_y.max())) + 1
    batch = min(lin.batch_size, len(train_y))
    steps = len(train_y) // batch  # the remainder of each permutation is dropped
    steps = min(steps, lin.steps_per_epoch or steps)
    tx, schedule = probe_optimizer(lin, steps)
    key = jax.random.key(lin.seed)
    state = init_state(init_probe(key, train_x.shape[1], num_classes), tx)
    update = jax.jit(functools.partial(probe_update, tx=tx))
    rng = np.random.default_rng(lin.seed)
    history = []
    for epoch in range(lin.epochs):
        order = rng.permutation(len(train_y))
        losses = []
        for s in range(steps):
            rows = order[s * batch : (s + 1) * batch]
            state, loss = update(state, train_x[rows], train_y[rows], np.ones(batch, bool))
            losses.append(loss)
        history.append(epoch_record(lin, epoch, schedule, steps, losses, state, val_x, val_y))
    return result_of(history, state, train_x.shape[1], num_classes)


def epoch_record(lin, epoch, schedule, steps, losses, state, val_x, val_y) -> dict[str, float]:
    record = {
        "epoch": float(epoch),
        "lr": float(schedule(epoch * steps)),
        "train/loss": float(np.mean(jax.device_get(losses))),
    }
    if (epoch + 1) % lin.val_every_epochs == 0 or epoch + 1 == lin.epochs:
        record["val/top1"], record["val/top5"] = accuracy(state.params, val_x, val_y)
    return record


def result_of(history, state: ProbeState, dim: int, num_classes: int) -> LinearResult:
    scored = [r for r in history if "val/top1" in r]
    best = max(scored, key=lambda r: r["val/top1"])
    return LinearResult(
        best_top1=best["val/top1"],
        best_epoch=int(best["epoch"]),
        per_epoch=history,
        params=jax.tree.map(np.asarray, jax.device_get(state.params)),
        feature_dim=dim,
        num_classes=num_classes,
    )


def probe_summary(result: LinearResult) -> dict[str, Any]:
    """JSON-friendly result (the probe weights left out)."""
    return {
        "best_top1": result.best_top1,
        "best_epoch": result.best_epoch,
        "feature_dim": result.feature_dim,
        "num_classes": result.num_classes,
        "per_epoch": result.per_epoch,
    }
