"""One front door: the same `--config` recipe and `--config.section.key=value` overrides, parsed
and refused the same way, for training, evaluation and the benchmark."""

import importlib.util
import logging
import pathlib
import subprocess
import sys

import pytest

from dino_jax import cli
from dino_jax.bench import step as bench_step
from dino_jax.config import ConfigError, default_config
from dino_jax.evaluate import cli as evaluate_cli
from dino_jax.train import main as train_main

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKBONE = ROOT / "tests" / "fixtures" / "backbone.pth"
OVERRIDES = [
    "--config.optim.lr=0.003",
    "--config.aug.global_scale=(0.3, 1.0)",
    "--config.model.norm_last_layer=False",
    "--config.eval.knn_ks=10,20",
    "--config.train.max_steps",  # the value as the next argument
    "7",
    "--config.data.split=",
]


def check_overridden(config):
    assert config.optim.lr == 0.003 and config.aug.global_scale == (0.3, 1.0)
    assert config.model.norm_last_layer is False and config.eval.knn_ks == (10, 20)
    assert config.train.max_steps == 7 and config.data.split == ""


@pytest.fixture
def captured(monkeypatch):
    """Each command's config, caught where its work would start (nothing is computed)."""
    seen = {}

    class Stop(Exception):
        pass

    def catch(name):
        def record(config, *args, **kwargs):
            seen[name] = config
            raise Stop

        return record

    monkeypatch.setattr("dino_jax.trainer.train", catch("train"))
    monkeypatch.setattr(bench_step, "run", catch("bench"))
    monkeypatch.setattr(evaluate_cli, "run_knn", lambda _, config, *rest: catch("evaluate")(config))
    return seen, Stop


def commands(tmp_path):
    return {
        "train": (train_main, ["--config=demo", f"--workdir={tmp_path}"]),
        "bench": (bench_step.main, ["--config=demo", "--steps", "1"]),
        "evaluate": (
            evaluate_cli.evaluate,
            ["knn", "--weights", str(BACKBONE), "--num_heads", "2", "--config=demo"],
        ),
    }


def test_the_same_overrides_reach_every_command(tmp_path, captured):
    seen, stop = captured
    for name, (main, argv) in commands(tmp_path).items():
        # demo's 28 px eval crop does not fit the fixture backbone's patch 8: evaluation
        # checks it against the weights, so give it a crop that fits
        extra = ["--config.eval.crop=24", "--config.eval.resize=24"] if name == "evaluate" else []
        with pytest.raises(stop):
            main([*argv, *OVERRIDES, *extra])
        check_overridden(seen[name])
        assert seen[name].model.patch_size == 7 or name == "evaluate"  # the demo recipe


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--config.optim.lrr=1"],
            "config.optim.lrr is not a setting; did you mean --config.optim.lr?",
        ),
        (["--config.optim.lr=abc"], "--config.optim.lr=abc: 'abc' is not a number"),
        (["--config.model.norm_last_layer=maybe"], "'maybe' is not a bool"),
        (["--config.optim=1"], "config.optim is a section"),
        (["--config=vit_smal16"], "no recipe of that name; did you mean vit_small16?"),
        (["--config.optim.lr"], "--config.optim.lr needs a value"),
    ],
    ids=["misspelt key", "wrong type", "bad bool", "section", "misspelt recipe", "no value"],
)
def test_every_command_refuses_the_same_mistake_with_the_same_message(
    argv, message, tmp_path, capsys, captured
):
    seen, _ = captured
    for name, (main, base) in commands(tmp_path).items():
        base = (
            [a for a in base if not a.startswith("--config=")] if "--config=" in argv[0] else base
        )
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == cli.USER_ERROR, name
        assert message in err and "Traceback" not in err, (name, err)
        assert name not in seen  # refused before any work


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def get_config(:\n", "SyntaxError"),
        ("x = 1\n", "AttributeError"),
        ("def get_config():\n    return {'optim': {}}\n", "returned dict, not a ConfigDict"),
    ],
    ids=["syntax error", "no get_config", "not a ConfigDict"],
)
def test_a_broken_recipe_file_is_a_message_not_a_traceback(source, message, tmp_path, capsys):
    recipe = tmp_path / "mine.py"
    recipe.write_text(source)
    with pytest.raises(SystemExit) as exit_info:
        train_main([f"--config={recipe}", f"--workdir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == cli.USER_ERROR and "Traceback" not in err
    assert f"config file {recipe} could not be loaded" in err or "ConfigDict" in err
    assert message in err and not (tmp_path / "run").exists()


def test_recipes_are_found_by_name_or_path_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"demo", "vit_small16", "vit_base16", "vit_small8"} <= set(cli.recipe_names())
    by_name = cli.load_config("vit_small16")
    by_path = cli.load_config(str(ROOT / "configs" / "vit_small16.py"))
    # a path relative to the checkout, typed in another folder, still names the recipe
    by_relative = cli.load_config("configs/vit_small16.py")
    assert by_name == by_path == by_relative and by_name.model.arch == "vit_small"
    with pytest.raises(ConfigError, match="recipes: "):
        cli.load_config("nothing_like_it")


def test_declared_types_and_none_for_placeholders():
    config = default_config()
    cli.apply_overrides(config, [("model.embed_dim", "48"), ("train.max_steps", "None")])
    assert config.model.embed_dim == 48 and config.train.max_steps is None
    cli.apply_overrides(config, [("optim.lr", "1e-3"), ("linear.crop_scale", "(1.0, 1.0)")])
    assert config.optim.lr == 0.001 and config.linear.crop_scale == (1.0, 1.0)
    with pytest.raises(ConfigError) as err:  # every problem at once
        cli.apply_overrides(config, [("optim.lr", "x"), ("optim.epoch", "1")])
    assert "'x' is not a number" in str(err.value) and "optim.epochs" in str(err.value)


@pytest.mark.parametrize(
    "command",
    [["dino_jax.train"], ["dino_jax.evaluate"], ["dino_jax.bench", "step"]],
    ids=["train", "evaluate", "bench"],
)
def test_help_exits_0_and_says_where_the_keys_are(command):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", *command, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    helped = run("--help")
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "--help-keys" in helped.stdout and "--config.section.key" in helped.stdout
    keys = run("--help-keys")
    assert keys.returncode == 0
    assert "--config.optim.lr=0.0005" in keys.stdout and "--config.linear.epochs=100" in keys.stdout


def test_only_the_tpu_probe_record_is_hidden_and_only_without_libtpu(monkeypatch):
    def record(message, level=logging.INFO):
        return logging.LogRecord(
            "jax._src.xla_bridge", level, "xla_bridge.py", 1, message, (), None
        )

    probe = record("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert cli.tpu_probe_noise(probe)
    assert not cli.tpu_probe_noise(record("Unable to initialize backend 'cuda': ..."))
    assert not cli.tpu_probe_noise(record(probe.msg, logging.WARNING))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # a TPU host
    assert not cli.tpu_probe_noise(probe)
