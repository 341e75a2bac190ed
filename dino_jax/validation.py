"""Validation of a config: per-section checks (reused by the evaluator and the multi-crop
settings) and the schema check against default_config(); each returns every problem found,
with what to change."""

from __future__ import annotations

import math
import os

import ml_collections

from dino_jax.config import ConfigError, closest_key, default_config, dotted, leaves
from dino_jax.objective import CENTERINGS
from dino_jax.validation_base import Errors, seed_error
from dino_jax.validation_eval import eval_errors, linear_errors
from dino_jax.validation_model import (
    backbone_use_errors,
    input_multiple,
    model_errors,
    optimizer_errors,
)
from dino_jax.validation_patches import patch_objective_errors
from dino_jax.validation_speed import flat_state_errors


def validate(
    c: ml_collections.ConfigDict,
    num_devices: int,
    num_processes: int = 1,
    platform: str | None = None,
) -> None:
    """Raise ConfigError listing every invalid value of `c`, with what to do about it;
    `platform`: the backend the run will use ("cpu", "gpu", "tpu"), when known."""
    errors = schema_errors(c)
    if not errors:  # the value checks assume every key is there with its declared type
        errors += model_errors(c.model, platform)
        errors += dino_errors(c.dino)
        errors += optim_errors(c.optim, c.dino, num_devices, num_processes)
        errors += optimizer_errors(c.optim)
        errors += aug_errors(c.aug, input_multiple(c.model))
        errors += data_errors(c.data, c.seed, c.init_from)
        errors += train_errors(c.train)
        errors += eval_errors(c.eval, input_multiple(c.model), num_devices)
        errors += linear_errors(c.linear)
        errors += crossed_errors(c)
        errors += backbone_use_errors(c)
        errors += patch_objective_errors(c, num_processes)
        errors += flat_state_errors(c)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def dino_errors(d: ml_collections.ConfigDict) -> list[str]:
    e = Errors()
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        e.check(0.0 < d[key] <= 1.0, f"dino.{key}={d[key]}: a temperature in (0, 1] is needed")
    e.check(
        0.0 <= d.momentum_teacher <= 1.0,
        f"dino.momentum_teacher={d.momentum_teacher}: use [0, 1] (official 0.996)",
    )
    e.check(
        0.0 <= d.center_momentum < 1.0,
        f"dino.center_momentum={d.center_momentum}: use [0, 1) (official 0.9)",
    )
    e.check(
        d.centering in CENTERINGS,
        f"dino.centering={d.centering!r}: use one of {', '.join(CENTERINGS)}",
    )
    e.positive_int("dino.koleo_chunks", d.koleo_chunks)
    e.check(
        d.koleo_weight >= 0.0,
        f"dino.koleo_weight={d.koleo_weight}: a weight >= 0 (DINOv2: 0.1; 0 turns KoLeo off)",
    )
    return e


def optim_errors(o, d, num_devices: int, num_processes: int) -> list[str]:
    e = Errors()
    e.positive_int("optim.batch_size", o.batch_size)
    e.positive_int("optim.epochs", o.epochs)
    e.splits_over_devices("optim.batch_size", o.batch_size, num_devices)
    if isinstance(o.batch_size, int) and o.batch_size > 0:
        e.check(
            o.batch_size % num_processes == 0,
            f"optim.batch_size={o.batch_size} is not divisible by the {num_processes} processes",
        )
    chunks = d.loss_chunks
    if chunks < 0:  # its type: schema_errors
        e.append(f"dino.loss_chunks={chunks!r}: an int >= 0 (0: the whole batch's logits)")
    elif chunks and isinstance(o.batch_size, int) and o.batch_size % num_devices == 0:
        per_device = o.batch_size // num_devices
        e.check(
            per_device % chunks == 0,
            f"dino.loss_chunks={chunks} does not split each device's {per_device} images"
            f" (optim.batch_size={o.batch_size} over {num_devices} devices) into equal chunks:"
            " use a divisor of it, or 0",
        )
    e.check(o.lr > 0, f"optim.lr={o.lr}: must be > 0")
    e.check(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr}: use [0, optim.lr]")
    e.check(
        o.weight_decay >= 0 and o.weight_decay_end >= 0, "optim.weight_decay(_end) must be >= 0"
    )
    e.check(o.clip_grad >= 0, f"optim.clip_grad={o.clip_grad}: >= 0 (0 disables clipping)")
    if isinstance(o.epochs, int):
        for key, value in [
            ("optim.warmup_epochs", o.warmup_epochs),
            ("optim.freeze_last_layer", o.freeze_last_layer),
            ("dino.warmup_teacher_temp_epochs", d.warmup_teacher_temp_epochs),
        ]:
            e.check(
                isinstance(value, int) and 0 <= value <= o.epochs,
                f"{key}={value}: an int in [0, optim.epochs={o.epochs}] (the schedule cannot be"
                " longer than training)",
            )
    return e


def aug_errors(a: ml_collections.ConfigDict, patch_size) -> list[str]:
    """The multi-crop settings (dino_jax.data.augment.MultiCropConfig is built from them)."""
    e = Errors()
    for name in ("global_size", "local_size", "n_global"):
        e.check(a[name] >= 1, f"aug.{name} must be >= 1, got {a[name]}")
    e.check(a.n_local >= 0, f"aug.n_local must be >= 0, got {a.n_local}")
    e.check(a.n_global == 2, f"aug.n_global={a.n_global}: DINO uses exactly 2 global crops")
    pairs = {}
    for name in ("global_scale", "local_scale", "ratio", "blur_radius"):
        if len(a[name]) != 2:
            e.append(f"aug.{name} needs two values (min, max), got {a[name]}")
        else:
            pairs[name] = (float(a[name][0]), float(a[name][1]))
    for name in ("global_scale", "local_scale"):
        if name in pairs:
            lo, hi = pairs[name]
            e.check(
                0.0 < lo <= hi <= 1.0,
                f"aug.{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}",
            )
    if "ratio" in pairs:
        lo, hi = pairs["ratio"]
        e.check(0.0 < lo <= hi, f"aug.ratio must satisfy 0 < min <= max, got {(lo, hi)}")
    if "blur_radius" in pairs:
        lo, hi = pairs["blur_radius"]
        e.check(0.0 <= lo <= hi, f"aug.blur_radius must satisfy 0 <= min <= max, got {(lo, hi)}")
    probs = {
        name: a[name] for name in ("flip_prob", "jitter_prob", "grayscale_prob", "local_blur_prob")
    }
    for name in ("global_blur_prob", "global_solarize_prob"):
        values = a[name]
        if len(values) != a.n_global:
            e.append(
                f"aug.{name} needs one value per global crop (n_global = {a.n_global}),"
                f" got {values}"
            )
        probs.update({f"{name}[{i}]": p for i, p in enumerate(values)})
    for name, p in probs.items():
        e.check(0.0 <= p <= 1.0, f"aug.{name} is a probability, must be in [0, 1], got {p}")
    for name in ("brightness", "contrast", "saturation"):
        e.check(a[name] >= 0.0, f"aug.{name} must be >= 0, got {a[name]}")
    e.check(0.0 <= a.hue <= 0.5, f"aug.hue must be in [0, 0.5], got {a.hue}")
    if len(a.mean) != 3 or len(a.std) != 3:
        e.append(f"aug.mean and aug.std need 3 values, got {a.mean}, {a.std}")
    elif min(a.std) <= 0.0:
        e.append(f"aug.std must be positive, got {a.std}")
    e.check(
        a.n_local == 0 or a.local_size <= a.global_size,
        f"aug.local_size={a.local_size} is larger than aug.global_size={a.global_size}: local"
        " crops are the small views (official 96 against 224)",
    )
    if isinstance(patch_size, int) and patch_size > 0:
        for key in ("global_size", "local_size"):
            value = a[key]
            e.check(
                isinstance(value, int) and value % patch_size == 0,
                f"aug.{key}={value} is not a multiple of model.patch_size={patch_size}:"
                " the crop must split into whole patches",
            )
    return e


def data_errors(data: ml_collections.ConfigDict, seed: int, init_from: str) -> list[str]:
    e = Errors()
    e.check(
        data.source in ("tfds", "folder", "demo", "synthetic"),
        f"data.source={data.source!r}: use tfds, folder, demo or synthetic",
    )
    if data.source in ("tfds", "folder"):
        from dino_jax.data.sources import missing_packages

        missing = missing_packages(data.source)
        e.check(missing is None, str(missing))
    if data.source == "folder":
        e.check(bool(data.data_dir), "data.data_dir is empty: give the image folder to train on")
        e.check(
            not data.data_dir or os.path.isdir(os.path.expanduser(data.data_dir)),
            f"data.data_dir={data.data_dir!r} is not a directory: give the image folder",
        )
    if data.source == "synthetic":
        e.positive_int("data.synthetic_examples", data.synthetic_examples)
        e.positive_int("data.synthetic_classes", data.synthetic_classes)
    for name, value in (("seed", seed), ("data.seed", data.seed)):
        error = seed_error(name, value)
        if error:
            e.append(error)
    e.check(data.prefetch >= 0, f"data.prefetch={data.prefetch}: must be >= 0")
    e.check(
        data.shuffle_buffer >= 0,
        f"data.shuffle_buffer={data.shuffle_buffer}: must be >= 0 (0 or 1: no shuffle buffer)",
    )
    e.check(
        not init_from or os.path.isfile(os.path.expanduser(init_from)),
        f"init_from={init_from!r} is not a file: give an official checkpoint.pth or leave it ''",
    )
    e.positive_int("data.canvas_size", data.canvas_size)
    return e


def train_errors(t: ml_collections.ConfigDict) -> list[str]:
    e = Errors()
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        e.positive_int(f"train.{key}", t[key])
    if t.max_steps is not None:
        e.positive_int("train.max_steps", t.max_steps)
    e.check(t.skip_nonfinite_steps >= 0, "train.skip_nonfinite_steps must be >= 0")
    e.check(
        isinstance(t.steps_in_flight, int)
        and not isinstance(t.steps_in_flight, bool)
        and t.steps_in_flight >= 1,
        f"train.steps_in_flight={t.steps_in_flight!r}: must be an int >= 1 (the compiled steps"
        " that run while the host prepares the next; 2 by default)",
    )
    e.check(
        isinstance(t.compilation_cache, str),
        f"train.compilation_cache={t.compilation_cache!r}: must be a string: 'auto', a folder,"
        " or '' (no persistent compilation cache)",
    )
    return e


def evaluates(c: ml_collections.ConfigDict) -> bool:
    """Whether a training run of `c` evaluates (k-NN) at all."""
    return bool(c.data.eval_test_split)


def crossed_errors(c: ml_collections.ConfigDict) -> list[str]:
    """Settings of different sections that contradict each other."""
    e = Errors()
    if evaluates(c):
        e.check(
            bool(c.data.eval_train_split),
            f"data.eval_train_split is empty but data.eval_test_split={c.data.eval_test_split!r}"
            " is set: name the split of the k-NN bank (or empty both: no evaluation)",
        )
    chunks, batch = c.dino.koleo_chunks, c.optim.batch_size
    if c.dino.koleo_weight and isinstance(chunks, int) and chunks > 0 and isinstance(batch, int):
        e.check(
            batch % chunks == 0,
            f"dino.koleo_chunks={chunks} does not split optim.batch_size={batch} into equal"
            " chunks: use a divisor of the batch size",
        )
    return e


def config_warnings(c: ml_collections.ConfigDict) -> list[str]:
    """Legitimate settings that probably do not do what was meant."""
    w = Errors()
    v = c.eval
    canvas = c.data.canvas_size
    # Images are shrunk to fit the canvas before cropping: a crop larger than the canvas is
    # always upsampled. Right for images that small (the demo's 28 px, CIFAR), a loss else.
    crops = [("aug.global_size", c.aug.global_size)]
    if evaluates(c):
        crops.append(("eval.crop", c.eval.crop))
    for key, size in crops:
        w.check(
            canvas >= size,
            f"data.canvas_size={canvas} is smaller than {key}={size}: images are shrunk to fit"
            f" the canvas first, so every crop is upsampled from at most {canvas} px. Right for"
            f" images that small; else use --config.data.canvas_size={size} or more",
        )
    if evaluates(c):
        w.check(
            v.knn_every_epochs == 0 or v.knn_every_epochs < c.optim.epochs,
            f"eval.knn_every_epochs={v.knn_every_epochs} is not less than optim.epochs="
            f"{c.optim.epochs}: k-NN runs once, at the end",
        )
    else:
        for key in ("report_baselines", "attention_images"):
            value = v[key]
            w.check(
                not value,
                f"eval.{key}={value!r} does nothing: data.eval_test_split is empty, so the run"
                " evaluates nothing",
            )
    return w


def _declared_type(reference: ml_collections.ConfigDict, name: str) -> type:
    node, leaf = dotted(reference, name)
    return node.get_type(leaf)


def _type_error(name: str, value, declared: type, default) -> str | None:
    """Why `value` cannot stand where default_config() declares `declared`, or None."""
    if value is None:
        return None if default is None else f"{name}=None: must be of type {declared.__name__}"
    if declared is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif declared is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif declared is tuple:
        ok = isinstance(value, (tuple, list))
    else:
        ok = isinstance(value, declared)
    if not ok:
        return f"{name}={value!r}: must be of type {declared.__name__}, not {type(value).__name__}"
    numbers = value if isinstance(value, (tuple, list)) else [value]
    if any(isinstance(x, float) and not math.isfinite(x) for x in numbers):
        return f"{name}={value!r}: must be finite"
    return None


def schema_errors(c: ml_collections.ConfigDict) -> list[str]:
    """Keys unknown to default_config() (a typo would otherwise be ignored silently), keys
    missing from it, values of the wrong type and non-finite numbers."""
    reference = default_config()
    expected, given = leaves(reference), leaves(c)
    errors = []
    for name in sorted(set(given) - set(expected)):
        close = closest_key(name, expected)
        hint = f" (did you mean {close}?)" if close else ""
        errors.append(f"{name}: unknown key{hint}; every key is declared in dino_jax/config.py")
    for name in sorted(set(expected) - set(given)):
        errors.append(f"{name}: missing; recipes start from default_config() and override it")
    for name in sorted(set(expected) & set(given)):
        declared = _declared_type(reference, name)
        error = _type_error(name, given[name], declared, expected[name])
        if error:
            errors.append(error)
    return errors
