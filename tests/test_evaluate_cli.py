"""`python -m dino_jax.evaluate`: weights from work directories and .pth files, k-NN, overrides."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from tiny import tiny_eval_config

from dino_jax import parallel
from dino_jax.config import flatten_config
from dino_jax.evaluate.__main__ import apply_overrides, load_config_file, main, split_overrides
from dino_jax.evaluate.features import feature_fn
from dino_jax.evaluate.knn_eval import knn_evaluation
from dino_jax.evaluate.probe import linear_config
from dino_jax.evaluate.weights import WeightsError, config_from_flat, load_weights

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKBONE = ROOT / "tests" / "fixtures" / "backbone.pth"


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


def test_unusable_weights_are_refused_clearly(tmp_path):
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
    with pytest.raises(SystemExit, match="does not exist"):
        main(["knn", "--weights", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="eval_test_split is empty"):
        main(["knn", "--weights", str(BACKBONE), "--num_heads", "2", "--data.eval_test_split="])


def test_config_overrides():
    pairs = split_overrides(
        [
            "--data.source",
            "folder",
            "--config.data.data_dir=/x",
            "--eval.knn_ks=10,20",
            "--linear.avgpool",
            "true",
            "--model.embed_dim",
            "48",
            "--eval.crop",
            "96",
        ]
    )
    assert pairs[1] == ("data.data_dir", "/x")
    config = load_config_file(str(ROOT / "configs" / "demo.py"))
    lin = linear_config()
    apply_overrides({"": config, "linear": lin}, pairs)
    assert (config.data.source, config.data.data_dir) == ("folder", "/x")
    assert config.eval.knn_ks == (10, 20) and config.eval.crop == 96
    assert config.model.embed_dim == 48 and lin.avgpool is True
    with pytest.raises(SystemExit, match="no such config key"):
        apply_overrides({"": config, "linear": lin}, [("data.nope", "1")])
    with pytest.raises(SystemExit, match="invalid literal"):
        apply_overrides({"": config, "linear": lin}, [("eval.crop", "big")])
    with pytest.raises(SystemExit, match="unrecognised"):
        split_overrides(["--verbose"])


def test_knn_command_on_a_trained_work_directory(workdir, tmp_path):
    # Bank and queries both from the 2,000-image test split keep the extraction short; the
    # second lookup of the split already reads the feature file the first one wrote.
    features = tmp_path / "features"
    args = [
        "knn",
        "--weights",
        str(workdir),
        "--data.eval_train_split",
        "test",
        "--data.eval_test_split",
        "test",
        "--eval.knn_max_train",
        "1000",
        "--features_dir",
        str(features),
    ]
    first = main([*args, "--out", str(tmp_path / "out")])
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
    again = main(args)  # reads the saved features
    assert saved.stat().st_mtime_ns == stamp
    assert again["metrics"] == {**first["metrics"], "knn/seconds": again["metrics"]["knn/seconds"]}
    with pytest.raises(SystemExit, match="another model"):
        main([*args, "--which", "student"])


def test_knn_command_with_an_official_backbone_and_data_options(tmp_path):
    result = main(
        [
            "knn",
            "--weights",
            str(BACKBONE),
            "--num_heads",
            "2",
            "--data.source",
            "synthetic",
            "--data.synthetic_examples",
            "64",
            "--data.synthetic_classes",
            "3",
            "--data.canvas_size",
            "40",
            "--eval.resize",
            "32",
            "--eval.crop",
            "32",
            "--eval.batch_size",
            "16",
            "--eval.knn_ks",
            "5,10",
        ]
    )
    assert result["source"] == "pth" and result["bank"] == 64
    assert set(result["metrics"]) >= {"knn/top1_k5", "knn/top1_k10", "knn/top1"}
    with pytest.raises(SystemExit, match="patch size"):
        main(["knn", "--weights", str(BACKBONE), "--num_heads", "2", "--eval.crop", "36"])


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
