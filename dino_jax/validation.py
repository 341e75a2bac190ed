"""Validation of a config: per-section checks (reused by the evaluator and the multi-crop
settings) and the schema check against default_config(); each returns every problem found,
with what to change."""

from __future__ import annotations

import math
import os

import ml_collections

from dino_jax.config import ConfigError, closest_key, default_config, dotted, leaves
from dino_jax.models.vit import ARCHS

DTYPES = ("float32", "bfloat16", "float16")


def validate(c: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Raise ConfigError listing every invalid value of `c`, with what to do about it."""
    errors = schema_errors(c)
    if not errors:  # the value checks assume every key is there with its declared type
        errors += model_errors(c.model)
        errors += dino_errors(c.dino)
        errors += optim_errors(c.optim, c.dino, num_devices, num_processes)
        errors += aug_errors(c.aug, c.model.patch_size)
        errors += data_errors(c.data, c.seed, c.init_from)
        errors += train_errors(c.train)
        errors += eval_errors(c.eval, c.model.patch_size, num_devices)
        errors += linear_errors(c.linear)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


class _Errors(list):
    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)

    def positive_int(self, name: str, value) -> None:
        self.check(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{name}={value!r}: must be a positive int",
        )


def model_errors(m: ml_collections.ConfigDict) -> list[str]:
    e = _Errors()
    e.check(
        m.arch in ARCHS or m.arch == "custom",
        f"model.arch={m.arch!r}: use one of {sorted(ARCHS)} or 'custom'",
    )
    if m.arch == "custom":
        for key in ("embed_dim", "depth", "num_heads"):
            value = m[key]
            e.check(
                isinstance(value, int) and value > 0,
                f"model.{key}={value!r}: a positive int is needed with arch='custom'",
            )
        if isinstance(m.embed_dim, int) and isinstance(m.num_heads, int) and m.num_heads > 0:
            e.check(
                m.embed_dim % m.num_heads == 0,
                f"model.embed_dim={m.embed_dim} is not divisible by num_heads={m.num_heads}",
            )
    for key in ("patch_size", "out_dim", "head_nlayers", "head_hidden_dim", "head_bottleneck_dim"):
        e.positive_int(f"model.{key}", m[key])
    e.check(0.0 <= m.drop_path_rate < 1.0, f"model.drop_path_rate={m.drop_path_rate}: use [0, 1)")
    for key in ("compute_dtype", "param_dtype"):
        e.check(m[key] in DTYPES, f"model.{key}={m[key]!r}: use one of {DTYPES}")
    e.check(
        m.attention in ("auto", "xla", "cudnn"),
        f"model.attention={m.attention!r}: use auto, xla or cudnn",
    )
    return e


def dino_errors(d: ml_collections.ConfigDict) -> list[str]:
    e = _Errors()
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
    return e


def optim_errors(o, d, num_devices: int, num_processes: int) -> list[str]:
    e = _Errors()
    e.positive_int("optim.batch_size", o.batch_size)
    e.positive_int("optim.epochs", o.epochs)
    if isinstance(o.batch_size, int) and o.batch_size > 0:
        e.check(
            o.batch_size % num_devices == 0,
            f"optim.batch_size={o.batch_size} is not divisible by the {num_devices} devices:"
            f" use a multiple of {num_devices}",
        )
        e.check(
            o.batch_size % num_processes == 0,
            f"optim.batch_size={o.batch_size} is not divisible by the {num_processes} processes",
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
    e = _Errors()
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
    e = _Errors()
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
    e.check(data.seed >= 0 and seed >= 0, "seed and data.seed must be >= 0")
    e.check(data.prefetch >= 0, f"data.prefetch={data.prefetch}: must be >= 0")
    e.check(
        not init_from or os.path.isfile(os.path.expanduser(init_from)),
        f"init_from={init_from!r} is not a file: give an official checkpoint.pth or leave it ''",
    )
    e.positive_int("data.canvas_size", data.canvas_size)
    return e


def train_errors(t: ml_collections.ConfigDict) -> list[str]:
    e = _Errors()
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        e.positive_int(f"train.{key}", t[key])
    if t.max_steps is not None:
        e.positive_int("train.max_steps", t.max_steps)
    e.check(t.skip_nonfinite_steps >= 0, "train.skip_nonfinite_steps must be >= 0")
    return e


def eval_errors(v: ml_collections.ConfigDict, patch_size, num_devices: int) -> list[str]:
    e = _Errors()
    e.check(v.knn_every_epochs >= 0, "eval.knn_every_epochs must be >= 0 (0: end only)")
    e.check(
        all(isinstance(k, int) and k > 0 for k in v.knn_ks),
        f"eval.knn_ks={v.knn_ks}: positive ints",
    )
    e.check(v.knn_temperature > 0, "eval.knn_temperature must be > 0")
    e.positive_int("eval.resize", v.resize)
    e.positive_int("eval.crop", v.crop)
    e.check(v.knn_max_train >= 0, "eval.knn_max_train must be >= 0 (0: the whole split)")
    e.check(v.attention_images >= 0, "eval.attention_images must be >= 0")
    e.check(v.crop <= v.resize, f"eval.crop={v.crop} is larger than eval.resize={v.resize}")
    if isinstance(patch_size, int) and patch_size > 0:
        e.check(
            v.crop % patch_size == 0,
            f"eval.crop={v.crop} is not a multiple of model.patch_size={patch_size}",
        )
    e.positive_int("eval.batch_size", v.batch_size)
    if isinstance(v.batch_size, int) and v.batch_size > 0:
        e.check(
            v.batch_size % num_devices == 0,
            f"eval.batch_size={v.batch_size} is not divisible by the {num_devices} devices:"
            f" use a multiple of {num_devices}",
        )
    return e


def linear_errors(lin: ml_collections.ConfigDict, depth: int | None = None) -> list[str]:
    """The linear probe's settings; `depth`: the probed backbone's, when known."""
    return [
        f"linear.{key}={lin[key]!r}: {need}"
        for key, ok, need in [
            ("epochs", lin.epochs >= 1, "at least 1"),
            ("lr", lin.lr > 0, "must be > 0"),
            ("batch_size", lin.batch_size >= 1, "at least 1"),
            ("momentum", 0 <= lin.momentum < 1, "in [0, 1)"),
            (
                "n_last_blocks",
                1 <= lin.n_last_blocks <= (depth or lin.n_last_blocks),
                f"in [1, depth={depth}]",
            ),
            (
                "crop_scale",
                len(lin.crop_scale) == 2 and 0 < lin.crop_scale[0] <= lin.crop_scale[1] <= 1,
                "0 < lo <= hi <= 1",
            ),
            ("val_every_epochs", lin.val_every_epochs >= 1, "at least 1"),
            ("steps_per_epoch", lin.steps_per_epoch >= 0, ">= 0 (0: the whole split)"),
            ("num_classes", lin.num_classes >= 0, ">= 0 (0: from the labels)"),
        ]
        if not ok
    ]


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
