"""Every configuration key the code reads, with the official defaults, and its validation.

Recipes in `configs/` start from `default_config()` and override; `validate` refuses a bad
config with every problem listed before anything is compiled or read.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from collections.abc import Iterable
from typing import Any

import ml_collections
from ml_collections import config_dict

from dino_jax.models.vit import ARCHS

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message lists what to change."""


def load_recipe(path: str | os.PathLike[str]) -> ml_collections.ConfigDict:
    """`get_config()` of a recipe file such as configs/vit_small16.py."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist: give one such as configs/demo.py")
    spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception as err:  # the recipe's own code failed: say where, not a traceback
        raise ConfigError(
            f"config file {path} could not be loaded ({type(err).__name__}: {err}); a recipe"
            " defines get_config() returning dino_jax.config.default_config() with changes"
        ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"config file {path}: get_config() returned {type(config).__name__}, not a ConfigDict"
        )
    return config


def dotted(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """(section, name) of a dotted key such as "optim.lr"; KeyError if a section is missing."""
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    return node, leaf


def default_config() -> ml_collections.ConfigDict:
    """The official ViT-S/16 recipe (main_dino.py defaults, 10 local crops) on ImageNet."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # An official checkpoint.pth / *_pretrain.pth to initialise the student and teacher from.
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    c.model.arch = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large | custom
    c.model.embed_dim = config_dict.placeholder(int)  # only for arch = custom
    c.model.depth = config_dict.placeholder(int)
    c.model.num_heads = config_dict.placeholder(int)
    c.model.patch_size = 16
    c.model.drop_path_rate = 0.1
    c.model.out_dim = 65536
    c.model.norm_last_layer = True
    c.model.use_bn_in_head = False
    c.model.head_nlayers = 3
    c.model.head_hidden_dim = 2048
    c.model.head_bottleneck_dim = 256
    # bf16 compute with float32 params; logits, loss, center and EMA stay float32. The
    # official code used fp16 autocast; "float32" reproduces its fp32 runs.
    c.model.compute_dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.attention = "auto"  # auto (= xla) | xla | cudnn (see recipe.attention_implementation)

    c.dino = ml_collections.ConfigDict()
    c.dino.student_temp = 0.1
    c.dino.teacher_temp = 0.04
    c.dino.warmup_teacher_temp = 0.04
    c.dino.warmup_teacher_temp_epochs = 0
    c.dino.momentum_teacher = 0.996
    c.dino.center_momentum = 0.9

    c.optim = ml_collections.ConfigDict()
    c.optim.batch_size = 1024  # global, over all devices and hosts
    c.optim.epochs = 100
    c.optim.lr = 0.0005  # per 256 images: peak lr = lr * batch_size / 256
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = 10
    c.optim.weight_decay = 0.04
    c.optim.weight_decay_end = 0.4
    c.optim.clip_grad = 3.0
    c.optim.freeze_last_layer = 1

    c.aug = ml_collections.ConfigDict()  # see dino_jax.data.augment.MultiCropConfig
    c.aug.global_size = 224
    c.aug.local_size = 96
    c.aug.n_global = 2
    c.aug.n_local = 10  # local_crops_number: the code default is 8, the best paper run 10
    c.aug.global_scale = (0.4, 1.0)
    c.aug.local_scale = (0.05, 0.4)
    c.aug.ratio = (3 / 4, 4 / 3)
    c.aug.flip_prob = 0.5
    c.aug.jitter_prob = 0.8
    c.aug.brightness = 0.4
    c.aug.contrast = 0.4
    c.aug.saturation = 0.2
    c.aug.hue = 0.1
    c.aug.grayscale_prob = 0.2
    c.aug.global_blur_prob = (1.0, 0.1)  # one per global crop
    c.aug.global_solarize_prob = (0.0, 0.2)
    c.aug.local_blur_prob = 0.5
    c.aug.blur_radius = (0.1, 2.0)
    c.aug.mean = (0.485, 0.456, 0.406)
    c.aug.std = (0.229, 0.224, 0.225)

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # tfds | folder | demo | synthetic
    c.data.tfds_name = "imagenet2012"
    c.data.split = "train"
    c.data.eval_train_split = "train"  # the k-NN bank
    c.data.eval_test_split = "validation"  # classified by k-NN
    c.data.data_dir = ""  # TFDS data_dir, an image folder, or a directory of IDX files
    c.data.manual_dir = ""  # where the ImageNet archives were downloaded by hand
    c.data.canvas_size = 512  # host output: images fit an L x L canvas, cropped on device
    c.data.seed = 0  # data order: epoch e of process p is a permutation seeded by (seed, e, p)
    c.data.shuffle_buffer = 10_000  # TFRecord-backed TFDS datasets only
    c.data.num_parallel_calls = -1  # decode threads; <= 0 lets tf.data tune it
    c.data.prefetch = 2  # global batches in flight to the devices
    c.data.synthetic_examples = 10_000
    c.data.synthetic_classes = 10

    c.train = ml_collections.ConfigDict()
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 1000
    c.train.keep_checkpoints = 3
    c.train.max_steps = config_dict.placeholder(int)  # stop early (tests, smoke runs)
    c.train.skip_nonfinite_steps = 0  # > 0: tolerate that many non-finite losses in a row
    c.train.allow_config_change = False  # resume although the recipe changed (lr, epochs)
    c.train.fsdp = False  # shard params and optimiser state over devices (large models)
    c.train.progress_bar = True

    c.eval = ml_collections.ConfigDict()
    c.eval.knn_every_epochs = 0  # 0: only at the end of training
    c.eval.knn_ks = (10, 20, 100, 200)
    c.eval.knn_temperature = 0.07
    c.eval.knn_max_train = 0  # 0: the whole split
    c.eval.resize = 256  # eval transform: resize shorter side, then center crop
    c.eval.crop = 224
    c.eval.batch_size = 256
    c.eval.attention_images = 0  # attention-map PNGs written at the end of training
    # At the end, also k-NN of the same network at its random init and of raw pixels.
    c.eval.report_baselines = False

    # The linear probe of a frozen backbone (eval_linear.py defaults): `dino-jax-evaluate linear`.
    c.linear = ml_collections.ConfigDict()
    c.linear.epochs = 100
    c.linear.lr = 0.001  # per 256 images: lr = lr * batch_size / 256
    c.linear.batch_size = 1024  # global (official: 128 per GPU on 8 GPUs)
    c.linear.momentum = 0.9  # SGD, no weight decay
    c.linear.n_last_blocks = 4  # ViT-S: 4; ViT-B: 1 with avgpool
    c.linear.avgpool = False  # append the mean patch token of the last block
    c.linear.crop_scale = (0.08, 1.0)  # RandomResizedCrop's default area range
    c.linear.val_every_epochs = 1
    c.linear.steps_per_epoch = 0  # 0: one pass over the training split; > 0 caps it (smoke runs)
    c.linear.num_classes = 0  # 0: largest validation label + 1
    c.linear.seed = 0
    return c


SECTIONS = ("model", "dino", "optim", "aug", "data", "train", "eval", "linear")


def validate(
    c: ml_collections.ConfigDict,
    num_devices: int,
    num_processes: int = 1,
    sections: tuple[str, ...] = SECTIONS,
) -> None:
    """Raise ConfigError listing every invalid value of `c` in `sections`, with what to do.

    Training checks every section; evaluation only the ones it reads (data, eval, linear).
    """
    errors = schema_errors(c)
    if errors:  # the value checks below assume every key is there with its declared type
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    checks = {
        "model": lambda: model_errors(c.model),
        "dino": lambda: dino_errors(c.dino),
        "optim": lambda: optim_errors(c.optim, c.dino, num_devices, num_processes),
        "aug": lambda: aug_errors(c.aug, c.model.patch_size),
        "data": lambda: data_errors(c.data, c.seed, c.init_from),
        "train": lambda: train_errors(c.train),
        "eval": lambda: eval_errors(c.eval, c.model.patch_size, num_devices),
        "linear": lambda: linear_errors(c.linear),
    }
    for section in sections:
        errors += checks[section]()
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


def _leaves(node, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{"section.key": value} with tuples as lists: the JSON form stored with checkpoints."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in _leaves(config).items()}


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


def closest_key(name: str, keys: Iterable[str]) -> str | None:
    """The key most like a misspelt `name`, if any is close."""
    close = difflib.get_close_matches(name, list(keys), n=1)
    return close[0] if close else None


def schema_errors(c: ml_collections.ConfigDict) -> list[str]:
    """Keys unknown to default_config() (a typo would otherwise be ignored silently), keys
    missing from it, values of the wrong type and non-finite numbers."""
    reference = default_config()
    expected, given = _leaves(reference), _leaves(c)
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
