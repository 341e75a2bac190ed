"""Invalid settings are refused by validation, before anything is written or compiled, with a
message that says what to change; the command line refuses keys that do not exist."""

import logging

import jax
import ml_collections
import pytest
from helpers.fault_config import train_py
from helpers.tiny import tiny_config

from dino_jax.config import ConfigError, dotted
from dino_jax.trainer import train

NEVER_THERE = "/nonexistent/dino_jax"


def set_values(**values):
    def apply(c):
        for key, value in values.items():
            node, leaf = dotted(c, key)
            node[leaf] = value

    return apply


def replace_optim_with_a_string_lr(c):
    # A config file may build a section from scratch, around ConfigDict's type checks.
    optim = c.optim.to_dict()
    optim["lr"] = "0.0005"
    c.optim = ml_collections.ConfigDict(optim)


def add_misspelt_key(c):
    c.optim.lrr = 0.001


def drop_key(c):
    del c.train["keep_checkpoints"]


SCHEDULE = "the schedule cannot be longer than training"
CASES = {
    # name: (change, part of the message)
    "patch size zero": (set_values(**{"model.patch_size": 0}), "model.patch_size=0: must be a"),
    "bool for a size": (
        set_values(**{"model.patch_size": True}),
        "model.patch_size=True: must be of type int, not bool",
    ),
    "crop not divisible by patch": (
        set_values(**{"aug.global_size": 18}),
        "aug.global_size=18 is not a multiple of model.patch_size=4",
    ),
    "local crop not divisible": (set_values(**{"aug.local_size": 6}), "aug.local_size=6 is not"),
    "batch not divisible by devices": (
        set_values(**{"optim.batch_size": 12}),
        "optim.batch_size=12 is not divisible by the 8 devices: use a multiple of 8",
    ),
    "negative batch": (set_values(**{"optim.batch_size": -16}), "optim.batch_size=-16: must be"),
    "zero epochs": (set_values(**{"optim.epochs": 0}), "optim.epochs=0: must be a positive int"),
    "teacher temperature zero": (
        set_values(**{"dino.teacher_temp": 0.0}),
        "dino.teacher_temp=0.0: a temperature in (0, 1] is needed",
    ),
    "student temperature above 1": (set_values(**{"dino.student_temp": 2.0}), "(0, 1]"),
    "teacher momentum above 1": (
        set_values(**{"dino.momentum_teacher": 1.5}),
        "dino.momentum_teacher=1.5: use [0, 1] (official 0.996)",
    ),
    "center momentum 1": (set_values(**{"dino.center_momentum": 1.0}), "use [0, 1)"),
    "lr warm-up longer than training": (set_values(**{"optim.warmup_epochs": 5}), SCHEDULE),
    "temperature warm-up longer than training": (
        set_values(**{"dino.warmup_teacher_temp_epochs": 3}),
        SCHEDULE,
    ),
    "last layer frozen longer than training": (
        set_values(**{"optim.freeze_last_layer": 3}),
        SCHEDULE,
    ),
    "lr zero": (set_values(**{"optim.lr": 0.0}), "optim.lr=0.0: must be > 0"),
    "lr infinite": (set_values(**{"optim.lr": float("inf")}), "optim.lr=inf: must be finite"),
    "lr nan": (set_values(**{"optim.lr": float("nan")}), "optim.lr=nan: must be finite"),
    "min lr above lr": (set_values(**{"optim.min_lr": 1.0}), "optim.min_lr=1.0: use [0, optim.lr]"),
    "negative weight decay": (set_values(**{"optim.weight_decay": -0.1}), "must be >= 0"),
    "negative clipping": (set_values(**{"optim.clip_grad": -1.0}), "0 disables clipping"),
    "unknown architecture": (set_values(**{"model.arch": "vit_huge"}), "use one of"),
    "heads do not divide width": (
        set_values(**{"model.num_heads": 3}),
        "model.embed_dim=16 is not divisible by num_heads=3",
    ),
    "drop path 1": (set_values(**{"model.drop_path_rate": 1.0}), "use [0, 1)"),
    "unknown dtype": (set_values(**{"model.compute_dtype": "fp8"}), "use one of"),
    "scale range reversed": (
        set_values(**{"aug.global_scale": (1.0, 0.4)}),
        "aug.global_scale must satisfy 0 < min <= max <= 1",
    ),
    "probability above 1": (set_values(**{"aug.flip_prob": 1.5}), "is a probability"),
    "zero std": (set_values(**{"aug.std": (0.0, 0.2, 0.2)}), "aug.std must be positive"),
    "three global crops": (set_values(**{"aug.n_global": 3}), "exactly 2 global crops"),
    "checkpoint every 0 steps": (set_values(**{"train.checkpoint_every_steps": 0}), "positive"),
    "keep no checkpoint": (set_values(**{"train.keep_checkpoints": 0}), "positive int"),
    "max steps 0": (set_values(**{"train.max_steps": 0}), "train.max_steps=0: must be"),
    "negative skip count": (
        set_values(**{"train.skip_nonfinite_steps": -1}),
        "train.skip_nonfinite_steps must be >= 0",
    ),
    "eval crop above resize": (set_values(**{"eval.crop": 32}), "is larger than eval.resize"),
    "eval batch not divisible": (
        set_values(**{"eval.batch_size": 12}),
        "eval.batch_size=12 is not divisible by the 8 devices",
    ),
    "unknown data source": (set_values(**{"data.source": "s3"}), "use tfds, folder, demo or"),
    "folder without a path": (
        set_values(**{"data.source": "folder", "data.data_dir": ""}),
        "data.data_dir is empty: give the image folder",
    ),
    "folder that is not there": (
        set_values(**{"data.source": "folder", "data.data_dir": NEVER_THERE}),
        f"data.data_dir='{NEVER_THERE}' is not a directory",
    ),
    "init_from that is not there": (
        set_values(**{"init_from": NEVER_THERE + ".pth"}),
        "is not a file: give an official checkpoint.pth",
    ),
    "negative data seed": (set_values(**{"data.seed": -1}), "data.seed must be >= 0"),
    "negative prefetch": (set_values(**{"data.prefetch": -1}), "data.prefetch=-1: must be >= 0"),
    "string for a float in a config file": (
        replace_optim_with_a_string_lr,
        "optim.lr='0.0005': must be of type float, not str",
    ),
    "unknown key in a config file": (
        add_misspelt_key,
        "optim.lrr: unknown key (did you mean optim.lr?)",
    ),
    "missing key in a config file": (drop_key, "train.keep_checkpoints: missing"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_invalid_setting_is_refused_before_any_compute(name, tmp_path, tally, caplog):
    change, message = CASES[name]
    config = tiny_config()
    change(config)
    workdir = tmp_path / "run"
    with tally.bad_input():
        caplog.set_level(logging.WARNING)
        with jax.log_compiles(), pytest.raises(ConfigError) as err:
            train(config, str(workdir))
        assert message in str(err.value)
        assert not workdir.exists()
        assert not [r for r in caplog.records if r.getMessage().startswith("Compiling")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--config.optim.lrr=1"],
            "--config.optim.lrr=1: config.optim.lrr is not a setting;"
            " did you mean --config.optim.lr?",
        ),
        (["--config.optim.lr=abc"], "--config.optim.lr=abc: 'abc' is not a number"),
        (["--config.optim.batch_size=12"], "not divisible by the 8 devices: use a multiple of 8"),
    ],
    ids=["unknown key", "wrong type", "invalid value"],
)
def test_train_py_refuses_bad_overrides_with_a_message(tmp_path, tally, args, message):
    with tally.bad_input():
        result = train_py(tmp_path / "run", *args)
        assert result.returncode != 0
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "run").exists()
