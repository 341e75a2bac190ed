"""`python -m dino_jax.evaluate`: weights from work directories and .pth files, k-NN, overrides."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers.tiny import SMALL_EVAL_DATA, tiny_eval_config

from dino_jax import parallel
from dino_jax.config import flatten_config
from dino_jax.evaluate.cli import evaluate
from dino_jax.evaluate.features import feature_fn
from dino_jax.evaluate.knn_eval import knn_evaluation
from dino_jax.evaluate.weights import WeightsError, config_from_flat, load_weights
from dino_jax.workdir import WorkdirLock

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKBONE = ROOT / "tests" / "fixtures" / "backbone.pth"


def refused(capsys, argv, message):
    """The command exits 2 with `message` on stderr and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        evaluate(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err


def tiny_train_config():
    return tiny_eval_config(2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from dino_jax.trainer import train

    path = tmp_path_factory.mktemp("run")
    assert train(tiny_train_config(), str(path)).status == "max_steps"
    return path


def test_work_directory_weights_and_config(workdir, monkeypatch):
    teacher, t_vars, info = load_weights(workdir)
    monkeypatch.chdir(workdir.parent)  # relative paths, as typed on a command line
    _, s_vars, s_info = load_weights(os.path.join(workdir.name, "checkpoints"), which="student")
    assert info.source == "workdir" and info.step == 2 and s_info.which == "student"
    assert (teacher.embed_dim, teacher.depth, teacher.num_heads, teacher.patch_size) == (
        32,
        1,
        2,
        4,
    )
    assert info.mean == tuple(tiny_train_config().aug.mean) and info.patch_size == 4
    # After two EMA steps the teacher trails the student.
    t, s = t_vars["params"]["cls_token"], s_vars["params"]["cls_token"]
    assert t.shape == (1, 1, 32) and not np.array_equal(t, s)
    # The saved flattened config comes back whole (compute dtype set for evaluation).
    expected = flatten_config(tiny_train_config())
    assert flatten_config(info.config) == {**expected, "model.compute_dtype": "float32"}


def test_config_from_flat_restores_types_and_skips_unknown_keys():
    flat = flatten_config(tiny_train_config())
    flat["aug.global_scale"] = [0.3, 1.0]  # JSON lists
    flat["model.removed_key"] = 1
    config = config_from_flat(flat)
    assert config.aug.global_scale == (0.3, 1.0) and config.model.embed_dim == 32


def test_unusable_weights_are_refused_clearly(tmp_path, capsys):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path: "without a checkpoints/",
        tmp_path / "empty": "no finished checkpoint",
        tmp_path / "notes.txt": "not a readable official DINO checkpoint",
        BACKBONE: "num_heads",
    }
    for path, message in cases.items():
        with pytest.raises(WeightsError, match=message):
            load_weights(path)
    with pytest.raises(WeightsError, match="no student"):
        load_weights(BACKBONE, num_heads=2, which="student")
    refused(capsys, ["knn", "--weights", str(tmp_path / "missing")], "does not exist")
    argv = ["knn", "--weights", str(BACKBONE), "--num_heads", "2"]
    refused(capsys, [*argv, "--config.data.eval_test_split="], "eval_test_split is empty")


def test_knn_command_on_a_trained_work_directory(workdir, tmp_path, capsys):
    # Bank and queries both from the 2,000-image test split keep the extraction short; the
    # second lookup of the split already reads the feature file the first one wrote.
    features = tmp_path / "features"
    args = [
        "knn",
        "--weights",
        str(workdir),
        "--config.data.eval_train_split=test",
        "--config.data.eval_test_split=test",
        "--config.eval.knn_max_train=1000",
        "--features_dir",
        str(features),
    ]
    first = evaluate([*args, "--out", str(tmp_path / "out")])
    assert (first["bank"], first["queries"]) == (1000, 2000)
    assert json.loads((tmp_path / "out" / "knn.json").read_text()) == first
    # The same protocol as the trainer's k-NN evaluation, same numbers.
    backbone, variables, info = load_weights(workdir)
    config = info.config
    config.data.eval_train_split = config.data.eval_test_split = "test"
    config.eval.knn_max_train = 1000
    config.eval.batch_size = 504  # a multiple of the 8 devices
    compiled = feature_fn.cache_info().misses
    expected = knn_evaluation(config, backbone, variables, parallel.make_mesh())
    assert feature_fn.cache_info().misses <= compiled + 1  # both splits: one feature function
    for key, value in expected.items():
        if key.startswith("knn/top"):
            assert first["metrics"][key] == pytest.approx(value), key

    (saved,) = features.iterdir()
    assert saved.name == "test.npz"
    stamp = saved.stat().st_mtime_ns
    with WorkdirLock(str(workdir)):  # a trainer holds it: evaluation only reads, so it runs
        again = evaluate(args)  # reads the saved features
    assert saved.stat().st_mtime_ns == stamp
    assert again["metrics"] == {**first["metrics"], "knn/seconds": again["metrics"]["knn/seconds"]}
    refused(capsys, [*args, "--which", "student"], "another model")


def test_knn_command_with_an_official_backbone_and_data_options(tmp_path, capsys):
    result = evaluate(
        [
            "knn",
            "--weights",
            str(BACKBONE),
            "--num_heads",
            "2",
            *SMALL_EVAL_DATA,
            "--config.eval.knn_ks=5,10",
        ]
    )
    assert result["source"] == "pth" and result["bank"] == 64
    assert set(result["metrics"]) >= {"knn/top1_k5", "knn/top1_k10", "knn/top1"}
    argv = ["knn", "--weights", str(BACKBONE), "--num_heads", "2", "--config.eval.crop=36"]
    refused(capsys, argv, "eval.crop=36 is not a multiple of model.patch_size=8")


def test_module_entry_point():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "dino_jax.evaluate", "attention", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "--image_size" in out.stdout and "--threshold" in out.stdout
